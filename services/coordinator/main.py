"""``dsi coordinator``: serve dsi.v1.GenerationService in front of targets and drafters."""

from __future__ import annotations

import argparse
import logging

from dsi.backends import non_negative_int
from dsi.domain.types import CHAIN
from dsi.serving.args import tree_shape
from dsi.serving.metrics import CoordinatorMetrics, add_metrics_argument, serve_metrics
from dsi.serving.server import announce, serve_until_signal, start_server
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Codec, Coordinator, Defaults
from services.coordinator.discovery import build_coordinator
from services.coordinator.engine import Strategy
from services.coordinator.openai_api import DEFAULT_MAX_REQUEST_BYTES, OpenAIApi, start_openai_api
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
    p.add_argument(
        "--tree",
        type=tree_shape,
        default=CHAIN,
        metavar="WxD",
        help="default token tree of the drafts: W candidates per position, alternatives with D-token branches"
        " (e.g. 3x2); 'chain' = one guess per position (default)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=non_negative_int,
        default=128,
        help="generation length for requests that give none, cut to the room the context leaves; 0 = up to the"
        " context limit (default: %(default)s)",
    )
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
    g = p.add_argument_group("HTTP (opt-in)")
    g.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, /health) on"
        " HOST:PORT (0 = any free port; default: off)",
    )
    g.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="model name of the OpenAI API (default: the first target's model id)",
    )
    g.add_argument(
        "--http-max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest OpenAI API request body; larger ones get 413 (default: %(default)s)",
    )
    add_metrics_argument(g)


def load_codec(path: str | None) -> Codec:
    if not path:
        return Codec()
    from transformers import AutoTokenizer

    return Codec(AutoTokenizer.from_pretrained(path, local_files_only=True))


async def build(args: argparse.Namespace) -> Coordinator:
    codec = load_codec(args.tokenizer)
    defaults = Defaults(Strategy(args.strategy), args.lookahead, args.max_new_tokens, args.max_sp_degree, args.tree)
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
    metrics = CoordinatorMetrics(coordinator) if args.metrics_port is not None else None
    if args.strategy == "dsi" and coordinator.engine.sp_degree < 2:
        log.warning("DSI needs at least 2 target replicas to overlap verifications; with 1 it is about SI's speed")
    running = await start_server(register(coordinator), args.host, args.port)
    http = []  # opt-in HTTP servers, stopped in this order
    api: OpenAIApi | None = None
    if args.http_port is not None:
        api, server = await start_openai_api(
            coordinator, args.host, args.http_port, args.served_model_name, args.http_max_request_bytes, args.grace
        )
        http.append(server)
        log.info("OpenAI-compatible API serving", extra={"url": server.url, "model": api.settings.model_name})
    if metrics is not None:
        http.append(await serve_metrics(metrics.registry, args.host, args.metrics_port))
        log.info("metrics serving", extra={"url": f"{http[-1].url}/metrics"})
    log.info(
        "coordinator serving",
        extra={
            "address": running.address,
            "targets": args.target,
            "drafters": args.drafter,
            "strategy": args.strategy,
            "lookahead": args.lookahead,
            "tree": str(args.tree),
        },
    )
    announce(args.announce, running.address)

    async def stop() -> None:  # after the gRPC server: HTTP requests get their own grace, then the peers close
        if api is not None:
            api.closing = True  # /health answers 503 from now on
        for server in http:
            await server.stop()
        await coordinator.close()

    await serve_until_signal(running, args.grace, args.drain_delay, on_stop=stop)
