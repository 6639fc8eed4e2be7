"""The coordinator process of ``dsi bench``: ``dsi coordinator`` whose client
channels carry injected network delay.

    python -m dsi.tools.experiments.coordinator --target A --target-delay-ms 2 \\
        --target B --target-delay-ms 0 --drafter C --drafter-delay-ms 1 ...

``--target-delay-ms`` / ``--drafter-delay-ms`` give, in order, the one-way
delay of each ``--target`` / ``--drafter`` link (missing ones are 0). Everything
else is the stock coordinator (same arguments, engine, servicer and shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from dsi.tools.experiments import netdelay


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dsi.tools.cli import _server_args
    from services.coordinator import main as coordinator

    p = argparse.ArgumentParser(prog="python -m dsi.tools.experiments.coordinator", description=__doc__)
    coordinator.add_arguments(p)
    _server_args(p, "coordinator", sessions=False)
    p.add_argument("--target-delay-ms", type=float, action="append", default=[], help="one-way delay per --target")
    p.add_argument("--drafter-delay-ms", type=float, action="append", default=[], help="one-way delay per --drafter")
    args = p.parse_args(argv)
    if len(args.target_delay_ms) > len(args.target) or len(args.drafter_delay_ms) > len(args.drafter):
        p.error("more delays than links")
    return args


async def run(args: argparse.Namespace) -> None:
    from dsi.backends import NgramDrafter, is_ngram
    from dsi.serving.gate import policy_from_args
    from dsi.serving.server import announce, serve_until_signal, start_server
    from dsi.wire.transport import GrpcDrafter, GrpcTarget
    from services.coordinator.coordinator import Coordinator, Defaults
    from services.coordinator.engine import Strategy
    from services.coordinator.main import load_codec
    from services.coordinator.service import register

    def delay(values: list[float], i: int) -> float:
        return values[i] if i < len(values) else 0.0

    targets = [
        (
            a,
            GrpcTarget(
                a,
                interceptors=netdelay.interceptors(delay(args.target_delay_ms, i)),
                verify_stream=args.verify_stream,
            ),
        )
        for i, a in enumerate(args.target)
    ]
    drafters = [
        (
            a,
            NgramDrafter(a)
            if is_ngram(a)
            else GrpcDrafter(
                a,
                interceptors=netdelay.interceptors(delay(args.drafter_delay_ms, i)),
                draft_stream=args.verify_stream,
            ),
        )
        for i, a in enumerate(args.drafter)
    ]
    defaults = Defaults(Strategy(args.strategy), args.lookahead, args.max_new_tokens, args.max_sp_degree)
    coordinator = await Coordinator.connect(
        targets, drafters, load_codec(args.tokenizer), defaults, args.connect_timeout
    )
    policy = policy_from_args(args, coordinator.engine.max_context)
    running = await start_server(register(coordinator), args.host, args.port, policy)
    announce(args.announce, running.address)
    await serve_until_signal(
        running, args.grace, args.drain_delay, on_stop=coordinator.close, wind_down=coordinator.shut_down
    )


def main(argv: list[str] | None = None) -> int:
    from dsi.serving import tracing
    from dsi.serving.logs import setup_logging

    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    tracing.setup("dsi-coordinator", args.otlp_endpoint)  # off unless asked for, as `dsi coordinator`
    try:
        asyncio.run(run(args))
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
