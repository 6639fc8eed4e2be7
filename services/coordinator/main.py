"""``dsi coordinator``: serve dsi.v1.GenerationService in front of targets and drafters."""

from __future__ import annotations

import argparse
import logging

from dsi.server import announce, serve_until_signal, start_server
from dsi.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Codec, Coordinator, Defaults
from services.coordinator.discovery import build_coordinator
from services.coordinator.engine import Strategy
from services.coordinator.service import register

log = logging.getLogger("dsi.coordinator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="ADDRESS",
        help="a target replica HOST:PORT, or dns:///NAME:PORT for every address behind a name"
        " (repeat: the replicas give speculation parallelism)",
    )
    p.add_argument(
        "--drafter",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a drafter HOST:PORT or dns:///NAME:PORT (repeat to spread generations over several)",
    )
    p.add_argument(
        "--strategy", choices=[s.value for s in Strategy], default="dsi", help="default strategy (default: %(default)s)"
    )
    p.add_argument("--lookahead", type=int, default=5, help="default draft tokens per chunk (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default generation length (default: %(default)s)")
    p.add_argument(
        "--max-sp-degree", type=int, default=0, help="at most this many target replicas per generation (default: all)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory (usually the target model directory)")
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=10.0,
        help="seconds between re-resolutions of dns:/// names (default: %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for targets and drafters at start-up (default: %(default)s)",
    )


def load_codec(path: str | None) -> Codec:
    if not path:
        return Codec()
    from transformers import AutoTokenizer

    return Codec(AutoTokenizer.from_pretrained(path, local_files_only=True))


async def build(args: argparse.Namespace) -> Coordinator:
    codec = load_codec(args.tokenizer)
    defaults = Defaults(Strategy(args.strategy), args.lookahead, args.max_new_tokens, args.max_sp_degree)
    coordinator = await build_coordinator(
        args.target,
        args.drafter,
        GrpcTarget,
        GrpcDrafter,
        codec,
        defaults,
        args.connect_timeout,
        interval=args.refresh_interval,
    )
    if codec.tokenizer is not None:
        from dsi.backends.hf import tokenizer_fingerprint

        expected = coordinator.targets[0].info.model.tokenizer_fingerprint
        if tokenizer_fingerprint(codec.tokenizer) != expected:
            log.warning(
                "the --tokenizer fingerprint differs from the target's; text may decode wrongly",
                extra={"tokenizer": args.tokenizer},
            )
    return coordinator


async def run(args: argparse.Namespace) -> None:
    coordinator = await build(args)
    if args.strategy == "dsi" and coordinator.engine.sp_degree < 2:
        log.warning("DSI needs at least 2 target replicas to overlap verifications; with 1 it is about SI's speed")
    running = await start_server(register(coordinator), args.host, args.port)
    log.info(
        "coordinator serving",
        extra={
            "address": running.address,
            "targets": args.target,
            "drafters": args.drafter,
            "strategy": args.strategy,
            "lookahead": args.lookahead,
        },
    )
    announce(args.announce, running.address)
    await serve_until_signal(running, args.grace, args.drain_delay, on_stop=coordinator.close)
