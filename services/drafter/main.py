"""``dsi drafter``: serve one drafter model instance."""

from __future__ import annotations

import argparse
import asyncio
import logging

from dsi.backends import LocalDrafter, add_model_arguments, apply_cpu_threads, load_drafter_model
from dsi.serving import tracing
from dsi.serving.metrics import add_metrics_argument, serve_service_metrics
from dsi.serving.server import announce, serve_until_signal, start_server
from services.drafter.service import register

log = logging.getLogger("dsi.drafter")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-lookahead", type=int, default=64, help="largest lookahead accepted (default: %(default)s)")
    add_metrics_argument(p)


async def run(args: argparse.Namespace) -> None:
    apply_cpu_threads(args.threads)
    model = load_drafter_model(args.model, args.device, args.dtype)
    drafter = LocalDrafter(model, args.max_sessions, args.session_idle_timeout, args.max_lookahead)
    sweeper = asyncio.ensure_future(drafter.sessions.sweep_forever())
    metrics = await serve_service_metrics("drafter", drafter, args.host, args.metrics_port)
    tracing.instrument_backend("drafter", drafter)  # after metrics: chains its hook; nothing when tracing is off
    running = await start_server(register(drafter), args.host, args.port)
    log.info(
        "drafter serving",
        extra={
            "address": running.address,
            "model": model.info.model_id,
            "device": model.info.device,
            "vocab_size": model.info.vocab_size,
        },
    )
    announce(args.announce, running.address)

    async def stop() -> None:
        sweeper.cancel()
        if metrics is not None:
            await metrics.stop()

    await serve_until_signal(running, args.grace, args.drain_delay, on_stop=stop)
