"""HTTP servers next to the gRPC ones, on the same asyncio loop (aiohttp):
the coordinator's OpenAI-compatible endpoint and every service's Prometheus
``/metrics``. Each is opt-in and listens on its own port, with the same TLS
and bearer token as the service's gRPC port (:class:`~dsi.wire.security.ServerSecurity`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from aiohttp import web

from dsi.wire.security import ServerSecurity, token_matches

log = logging.getLogger(__name__)


@dataclass
class HttpServer:
    runner: web.AppRunner
    host: str
    port: int
    tls: bool = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    async def stop(self) -> None:
        """Stop listening, give running requests the grace given to
        :func:`start_http`, then close every connection (which cancels the
        handlers still running)."""
        await self.runner.cleanup()


#: Paths answered without a token: health checks (load balancers and probes send none).
OPEN_PATHS = frozenset({"/health"})


def bearer_auth(token: str, open_paths: Collection[str] = OPEN_PATHS):
    """Middleware: requests without ``Authorization: Bearer <token>`` get 401
    with an OpenAI-style JSON error."""

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path in open_paths or token_matches(request.headers.get("Authorization"), token):
            return await handler(request)
        given = "Authorization" in request.headers
        message = ("invalid bearer token" if given else "missing bearer token") + (
            ": send the header 'Authorization: Bearer <token>'"
        )
        body = {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})

    return check


async def start_http(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    grace: float = 5.0,
    security: ServerSecurity | None = None,
) -> HttpServer:
    """Serve ``app`` on ``host:port`` (0 = any free port); on stop, running
    requests get ``grace`` seconds to finish. ``security``: TLS (mutual with a
    CA) and a bearer token, as on the gRPC port (default: plaintext, open).

    A client that disconnects cancels its request's handler
    (``handler_cancellation``), so a generation behind it is cancelled at once
    and releases everything it holds, as a cancelled gRPC call does."""
    security = security or ServerSecurity()
    if security.token:
        app.middlewares.insert(0, bearer_auth(security.token))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), port, reuse_port=False, ssl_context=security.ssl_context())
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from None
    bound = runner.addresses[0][1]
    return HttpServer(runner, host.strip("[]"), bound, security.tls)
