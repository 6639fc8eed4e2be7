"""The ``dsi`` command.

dsi target       serve a target model instance
dsi drafter      serve a drafter model instance
dsi coordinator  serve the generation API in front of targets and drafters
dsi generate     stream a generation from a coordinator
dsi up           start everything locally on embedded defaults
dsi simulate     offline model of non-SI, SI and DSI
dsi bench        measure non-SI, SI and DSI through real services
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from dsi import __version__
from dsi.domain.errors import DsiError
from dsi.serving import tracing
from dsi.serving.args import lookahead, tree_shape
from dsi.serving.logs import setup_logging
from dsi.serving.tracing import add_tracing_argument

DEFAULT_PORTS = {"coordinator": 50050, "target": 50051, "drafter": 50052}


def _server_args(p: argparse.ArgumentParser, role: str, sessions: bool) -> None:
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 or :: for all)"
    )
    g.add_argument(
        "--port", type=int, default=DEFAULT_PORTS[role], help="port (0 = any free port; default: %(default)s)"
    )
    g.add_argument(
        "--grace", type=float, default=5.0, help="seconds running RPCs get to finish on shutdown (default: %(default)s)"
    )
    g.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        help="seconds between reporting NOT_SERVING and stopping (default: %(default)s)",
    )
    g.add_argument("--announce", metavar="FILE", help="write the bound address to FILE once serving")
    from dsi.serving.gate import add_server_arguments

    add_server_arguments(p.add_argument_group("security and limits"))
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-format", default="json", choices=["json", "text"])
    add_tracing_argument(g)
    if sessions:
        g.add_argument("--max-sessions", type=int, default=256, help="sessions held at once (default: %(default)s)")
        g.add_argument(
            "--session-idle-timeout",
            type=float,
            default=600.0,
            help="seconds before an idle session is dropped (default: %(default)s)",
        )


def _serve(run: Callable[[argparse.Namespace], Coroutine[Any, Any, None]]) -> Callable[[argparse.Namespace], int]:
    def _main(args: argparse.Namespace) -> int:
        setup_logging(args.log_level, args.log_format)
        tracing.setup(f"dsi-{args.command}", args.otlp_endpoint)  # off unless asked for
        try:
            asyncio.run(run(args))
        finally:
            tracing.shutdown()  # exports what is buffered
        return 0

    return _main


def _request_lookahead(text: str) -> int:
    """``--lookahead`` of a request: N >= 0 (0: the server's default), or
    ``auto`` (the client's ``AUTO``: chosen as the generation runs)."""
    from dsi.wire.client import AUTO

    n = lookahead(text)
    return AUTO if n == 0 and text.strip().lower() == "auto" else n


def _parse_ids(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-ids", metavar="1,2,3", help="prompt as token ids (for synthetic models)")
    p.add_argument(
        "--max-new-tokens", type=int, default=0, help="tokens to generate (0 = the server default, cut to the context)"
    )
    p.add_argument("--strategy", choices=["nonsi", "si", "dsi"], default="", help="(default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampling; the same seed gives the same text under every strategy (default: a fresh one,"
        " shown in the statistics line)",
    )
    p.add_argument(
        "--lookahead",
        type=_request_lookahead,
        default=0,
        metavar="N|auto",
        help="draft tokens per chunk (0 = the server default; auto: chosen as the generation runs)",
    )
    p.add_argument(
        "--tree",
        type=tree_shape,
        default=None,
        metavar="WxD",
        help="draft a token tree: W candidates per position, alternatives with D-token branches (e.g. 3x2);"
        " 'chain' for one guess per position (default: the server's)",
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def stats_line(r: Any) -> str:
    s = r.stats
    rate = s["new_tokens"] / s["wall_seconds"] if s.get("wall_seconds") else 0.0
    return (
        f"-- {s['new_tokens']} tokens in {s['wall_seconds']:.3f}s ({rate:.1f} tok/s), "
        f"first token {s['time_to_first_token_seconds'] * 1000:.0f} ms, "
        f"acceptance {s['acceptance_rate']:.2f}, target passes {s['target_forward_passes']}, "
        f"verifications {s['verifications_started']} ({s['verifications_cancelled']} cancelled, "
        f"{s['preemptions']} preempted)"
        + (f", tree alternatives {s['alternative_hits']}" if s.get("alternative_hits") else "")
        + f", seed {s.get('seed', 0)}, finish: {r.finish_reason}"
    )


async def _generate(args: argparse.Namespace) -> int:
    from dsi.wire.client import Client, request

    req = request(
        args.prompt or "",
        _parse_ids(args.prompt_ids),
        args.max_new_tokens,
        args.strategy,
        args.temperature,
        args.top_p,
        args.top_k,
        args.seed,
        args.lookahead,
        args.stop,
        args.tree,
        timeline=bool(args.timeline),
    )
    if not args.prompt and not req.prompt_token_ids:
        raise SystemExit("give a PROMPT or --prompt-ids")

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    from dsi.serving.gate import client_from_args

    async with Client(args.coordinator, client_from_args(args)) as client:
        result = await client.generate(req, None if args.json else show)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print()
        print(stats_line(result), file=sys.stderr)
    if args.timeline:
        if result.timeline is None:
            raise SystemExit("dsi generate: the coordinator sent no timeline (older than GenerateRequest.timeline?)")
        from dsi.tools.timeline import write

        written = write(result.timeline, args.timeline)
        if len(written) < 2:
            print("dsi generate: no PNG (install matplotlib: pip install 'dsi[experiments]')", file=sys.stderr)
        print(f"timeline: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args))


def _cmd_up(args: argparse.Namespace) -> int:
    from dsi.tools.up import main as up_main

    return asyncio.run(up_main(args))


def build_parser() -> argparse.ArgumentParser:
    from services.coordinator import main as coordinator
    from services.drafter import main as drafter
    from services.target import main as target

    parser = argparse.ArgumentParser(prog="dsi", description="Distributed Speculative Inference over gRPC.")
    parser.add_argument("--version", action="version", version=f"dsi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("target", help="serve a target model instance", description=target.__doc__)
    target.add_arguments(p)
    _server_args(p, "target", sessions=True)
    p.set_defaults(func=_serve(target.run))

    p = sub.add_parser("drafter", help="serve a drafter model instance", description=drafter.__doc__)
    drafter.add_arguments(p)
    _server_args(p, "drafter", sessions=True)
    p.set_defaults(func=_serve(drafter.run))

    p = sub.add_parser("coordinator", help="serve the generation API", description=coordinator.__doc__)
    coordinator.add_arguments(p)
    _server_args(p, "coordinator", sessions=False)
    p.set_defaults(func=_serve(coordinator.run))

    p = sub.add_parser("generate", help="stream a generation from a coordinator")
    p.add_argument("prompt", nargs="?", default="", help="prompt text (needs a coordinator with a tokenizer)")
    p.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_PORTS['coordinator']}", metavar="HOST:PORT")
    _generation_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument(
        "--timeline",
        metavar="FILE",
        help="write the generation's schedule to FILE.json (Chrome trace events: Perfetto, chrome://tracing) and"
        " FILE.png (a .json or .png suffix is taken off first)",
    )
    from dsi.serving.gate import add_client_arguments

    add_client_arguments(p.add_argument_group("security (default: plaintext, no token)"))
    p.set_defaults(func=_cmd_generate)

    from dsi.tools.up import add_arguments as up_arguments

    p = sub.add_parser(
        "up",
        help="start targets, a drafter and a coordinator locally",
        description="Start target replica(s), a drafter and a coordinator as local processes.",
    )
    up_arguments(p)
    p.set_defaults(func=_cmd_up)

    from dsi.tools.experiments import bench, simulate

    p = sub.add_parser(
        "simulate",
        help="offline model of non-SI, SI and DSI (one point or a heatmap grid)",
        description=simulate.__doc__,
    )
    simulate.add_arguments(p)
    p.set_defaults(func=simulate.main)

    p = sub.add_parser("bench", help="measure non-SI, SI and DSI through real services", description=bench.__doc__)
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except DsiError as exc:
        print(f"dsi {args.command}: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except OSError as exc:
        print(f"dsi {args.command}: error: {exc}", file=sys.stderr)
        code = 1
    raise SystemExit(code)
