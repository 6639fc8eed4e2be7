"""``dsi target``: serve one target model instance."""

from __future__ import annotations

import argparse
import asyncio
import logging

from dsi.backends import (
    LocalTarget,
    add_batch_arguments,
    add_model_arguments,
    apply_cpu_threads,
    batch_limits_from_args,
    load_target_model,
    synthetic,
)
from dsi.serving import tracing
from dsi.serving.gate import add_concurrency_argument, policy_from_args, security_from_args
from dsi.serving.metrics import add_metrics_argument, serve_service_metrics
from dsi.serving.server import announce, serve_until_signal, start_server
from services.target.service import MODEL_METHODS, TargetServicer, register_servicer

log = logging.getLogger("dsi.target")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-draft-tokens", type=int, default=64, help="draft tokens per Verify (default: %(default)s)")
    add_batch_arguments(p, "Verify requests")
    add_concurrency_argument(p, "Verify requests")
    add_metrics_argument(p)


async def run(args: argparse.Namespace) -> None:
    security = security_from_args(args)  # bad TLS files: an error now, not after loading the model
    apply_cpu_threads(args.threads)
    synthetic.time_passes_exactly()  # this loop serves one model: a synthetic pass waits as long as its spec says
    model = load_target_model(args.model, args.device, args.dtype)
    target = LocalTarget(
        model, args.max_sessions, args.session_idle_timeout, args.max_draft_tokens, batch_limits_from_args(args)
    )
    sweeper = asyncio.ensure_future(target.sessions.sweep_forever())
    policy = policy_from_args(args, model.info.max_context_tokens, MODEL_METHODS, security)
    metrics = await serve_service_metrics("target", target, args.host, args.metrics_port, policy.security)
    tracing.instrument_backend("target", target)  # after metrics: chains its hook; nothing when tracing is off
    servicer = TargetServicer(target)
    running = await start_server(register_servicer(servicer), args.host, args.port, policy)
    log.info(
        "target serving",
        extra={
            "address": running.address,
            "model": model.info.model_id,
            "device": model.info.device,
            "vocab_size": model.info.vocab_size,
            "security": policy.security.describe(),
            "max_message_bytes": policy.max_message_bytes,
            "health_port": running.health_port,
        },
    )
    announce(args.announce, running.address)

    async def stop() -> None:
        sweeper.cancel()
        if metrics is not None:
            await metrics.stop()

    await serve_until_signal(running, args.grace, args.drain_delay, on_stop=stop, wind_down=servicer.wind_down)
