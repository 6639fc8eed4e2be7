"""``dsi drafter``: serve one drafter model instance."""

from __future__ import annotations

import argparse
import asyncio
import logging

from dsi.backends import (
    LocalDrafter,
    NgramDrafter,
    add_batch_arguments,
    add_model_arguments,
    apply_cpu_threads,
    batch_limits_from_args,
    is_ngram,
    load_drafter_model,
    synthetic,
)
from dsi.serving import tracing
from dsi.serving.gate import add_concurrency_argument, policy_from_args, security_from_args
from dsi.serving.metrics import add_metrics_argument, serve_service_metrics
from dsi.serving.server import announce, serve_until_signal, start_server
from services.drafter.service import MODEL_METHODS, DrafterServicer, register_servicer

log = logging.getLogger("dsi.drafter")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-lookahead", type=int, default=64, help="largest lookahead accepted (default: %(default)s)")
    add_batch_arguments(p, "Draft streams' token steps")
    add_concurrency_argument(p, "Draft streams")
    add_metrics_argument(p)


async def run(args: argparse.Namespace) -> None:
    security = security_from_args(args)  # bad TLS files: an error now, not after loading the model
    apply_cpu_threads(args.threads)
    synthetic.time_passes_exactly()  # this loop serves one model: a synthetic pass waits as long as its spec says
    drafter: LocalDrafter | NgramDrafter
    if is_ngram(args.model):  # prompt lookup: no model, no sessions
        drafter = NgramDrafter(args.model, args.max_lookahead)
        sweeper = None
    else:
        model = load_drafter_model(args.model, args.device, args.dtype)
        drafter = LocalDrafter(
            model, args.max_sessions, args.session_idle_timeout, args.max_lookahead, batch_limits_from_args(args)
        )
        sweeper = asyncio.ensure_future(drafter.sessions.sweep_forever())
    model_info = drafter.model.info
    policy = policy_from_args(args, model_info.max_context_tokens, MODEL_METHODS, security)
    metrics = await serve_service_metrics("drafter", drafter, args.host, args.metrics_port, policy.security)
    tracing.instrument_backend("drafter", drafter)  # after metrics: chains its hook; nothing when tracing is off
    servicer = DrafterServicer(drafter)
    running = await start_server(register_servicer(servicer), args.host, args.port, policy)
    log.info(
        "drafter serving",
        extra={
            "address": running.address,
            "model": model_info.model_id,
            "device": model_info.device,
            "vocab_size": model_info.vocab_size,
            "security": policy.security.describe(),
            "max_message_bytes": policy.max_message_bytes,
            "health_port": running.health_port,
        },
    )
    announce(args.announce, running.address)

    async def stop() -> None:
        if sweeper is not None:
            sweeper.cancel()
        if metrics is not None:
            await metrics.stop()

    await serve_until_signal(running, args.grace, args.drain_delay, on_stop=stop, wind_down=servicer.wind_down)
