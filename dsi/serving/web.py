"""HTTP servers next to the gRPC ones, on the same asyncio loop (aiohttp):
the coordinator's OpenAI-compatible endpoint and every service's Prometheus
``/metrics``. Each is opt-in and listens on its own port."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass
class HttpServer:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def stop(self) -> None:
        """Stop listening, give running requests the grace given to
        :func:`start_http`, then close every connection (which cancels the
        handlers still running)."""
        await self.runner.cleanup()


async def start_http(app: web.Application, host: str = "127.0.0.1", port: int = 0, grace: float = 5.0) -> HttpServer:
    """Serve ``app`` on ``host:port`` (0 = any free port); on stop, running
    requests get ``grace`` seconds to finish.

    A client that disconnects cancels its request's handler
    (``handler_cancellation``), so a generation behind it is cancelled at once
    and releases everything it holds, as a cancelled gRPC call does."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), port, reuse_port=False)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from None
    bound = runner.addresses[0][1]
    return HttpServer(runner, host.strip("[]"), bound)
