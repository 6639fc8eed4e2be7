"""``dsi coordinator``: serve dsi.v1.GenerationService in front of targets and drafters."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
from typing import Any

from dsi.backends import NgramDrafter, is_ngram, non_negative_int
from dsi.domain.interfaces import Drafter
from dsi.domain.types import CHAIN
from dsi.serving.args import lookahead, tree_shape
from dsi.serving.gate import add_client_arguments, client_from_args, policy_from_args, security_from_args
from dsi.serving.metrics import CoordinatorMetrics, add_metrics_argument, serve_metrics
from dsi.serving.server import WIND_DOWN_MARGIN, announce, serve_until_signal, start_server
from dsi.wire.security import ClientSecurity
from dsi.wire.transport import GrpcDrafter, GrpcTarget, verify_stream_default
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
        help="a drafter HOST:PORT or dns:///NAME:PORT, or ngram[:n=3,min_n=2,k=8] for prompt lookup run inside the"
        " coordinator (no network hop, no model). Repeat: instances of one model spread generations, different"
        " models (the first is the primary) all draft every generation",
    )
    p.add_argument(
        "--strategy", choices=[s.value for s in Strategy], default="dsi", help="default strategy (default: %(default)s)"
    )
    p.add_argument(
        "--lookahead",
        type=lookahead,
        default=0,
        metavar="N|auto",
        help="default draft tokens per chunk; 'auto' (or 0): chosen per generation from the acceptance, drafter"
        " speed and target latency it measures, and changed as they change (default: auto)",
    )
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
    p.add_argument(
        "--max-generations",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="generations at once (gRPC and HTTP together); more are refused RESOURCE_EXHAUSTED / HTTP 429"
        " (default 0: as many as every target replica, and the drafters together, have sessions for)",
    )
    p.add_argument(
        "--no-verify-stream",
        dest="verify_stream",
        action="store_false",
        default=verify_stream_default(),
        help="send each verification as its own Verify call, not as a message on one VerifyStream per target"
        " replica, decode non-SI with Verify calls, not a Decode stream, and draft with a Draft call per draft"
        " stream, not a message on one DraftStream per drafter (the streams are the default with peers that"
        " serve them; for comparisons; also $DSI_VERIFY_STREAM=0)",
    )
    p.add_argument(
        "--verify-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest a verification may take; once a replica's latency is measured its deadline is 10x that"
        " (scaled by the tokens it must prefill, at least 2 s). A replica past its deadline is taken out of"
        " service until its health check answers, and the verification is issued again on another replica"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--draft-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest wait for a drafter's next chunk; past it the drafter is out of service until its health"
        " check answers, and generations go on with target-only steps meanwhile (default: %(default)s)",
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
    add_client_arguments(
        p.add_argument_group("connections to targets and drafters (default: plaintext, no token)"), prefix="peer-"
    )


def load_codec(path: str | None) -> Codec:
    if not path:
        return Codec()
    from transformers import AutoTokenizer

    return Codec(AutoTokenizer.from_pretrained(path, local_files_only=True))


def make_drafter(spec: str, security: ClientSecurity | None = None, **kw: Any) -> Drafter:
    """An in-process prompt-lookup drafter for an ``ngram:...`` spec, else a
    gRPC client of the drafter at that address."""
    if is_ngram(spec):
        return NgramDrafter(spec)
    return GrpcDrafter(spec, security=security, **kw)


async def build(args: argparse.Namespace) -> Coordinator:
    peers = client_from_args(args, "peer-")
    codec = load_codec(args.tokenizer)
    defaults = Defaults(
        Strategy(args.strategy),
        args.lookahead,
        args.max_new_tokens,
        args.max_sp_degree,
        tree=args.tree,
        max_generations=args.max_generations,
        verify_timeout=args.verify_timeout,
        draft_timeout=args.draft_timeout,
    )
    coordinator = await build_coordinator(
        args.target,
        args.drafter,
        functools.partial(GrpcTarget, security=peers, verify_stream=args.verify_stream),
        functools.partial(make_drafter, security=peers, draft_stream=args.verify_stream),
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
    security = security_from_args(args)  # bad TLS files: an error now, not after connecting
    coordinator = await build(args)
    metrics = CoordinatorMetrics(coordinator) if args.metrics_port is not None else None
    if args.strategy == "dsi" and coordinator.engine.sp_degree < 2:
        log.warning("DSI needs at least 2 target replicas to overlap verifications; with 1 it is about SI's speed")
    policy = policy_from_args(args, coordinator.engine.max_context, security=security)
    running = await start_server(register(coordinator), args.host, args.port, policy)
    api_server = metrics_server = None
    api: OpenAIApi | None = None
    if args.http_port is not None:
        api, api_server = await start_openai_api(
            coordinator,
            args.host,
            args.http_port,
            args.served_model_name,
            args.http_max_request_bytes,
            args.grace + WIND_DOWN_MARGIN,  # the coordinator ends its generations within the grace
            security,
        )
        log.info("OpenAI-compatible API serving", extra={"url": api_server.url, "model": api.settings.model_name})
    if metrics is not None:
        metrics_server = await serve_metrics(metrics.registry, args.host, args.metrics_port, security=security)
        log.info("metrics serving", extra={"url": f"{metrics_server.url}/metrics"})
    log.info(
        "coordinator serving",
        extra={
            "address": running.address,
            "targets": args.target,
            "drafters": args.drafter,
            "strategy": args.strategy,
            "lookahead": args.lookahead or "auto",
            "tree": str(args.tree),
            "max_generations": coordinator.max_generations,
            "security": security.describe(),
            "max_message_bytes": policy.max_message_bytes,
            "health_port": running.health_port,
        },
    )
    announce(args.announce, running.address)

    def on_signal() -> None:
        if api is not None:
            api.closing = True  # /health answers 503 from now on

    async def wind_down(grace: float) -> None:
        # As gRPC stops taking calls, so does HTTP; running generations of both
        # get the grace, then end with FINISH_REASON_CANCELLED (a last message).
        http = asyncio.ensure_future(api_server.stop()) if api_server is not None else None
        try:
            await coordinator.shut_down(grace)
        finally:
            if http is not None:
                await http

    async def stop() -> None:  # after both APIs: the metrics, then the peers
        if metrics_server is not None:
            await metrics_server.stop()
        await coordinator.close()

    await serve_until_signal(
        running, args.grace, args.drain_delay, on_stop=stop, on_signal=on_signal, wind_down=wind_down
    )
