"""Server bootstrap shared by the three services: a grpc.aio server with
standard health checking and reflection, and graceful shutdown on signals
(health NOT_SERVING first, then ``server.stop(grace)``). What a server lets in
(TLS, tokens, request sizes, concurrency) is its :class:`~dsi.serving.gate.Policy`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dsi.serving import tracing
from dsi.serving.gate import Policy

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port already in use is an error, not a silent share
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The standard grpc.health.v1 service, whose Watch streams end once they
    have reported NOT_SERVING at shutdown.

    (grpcio's own aio servicer keeps Watch streams open until the server is
    gone, so a client that watches health, as gRPC client-side health checking
    does, would hold up every graceful shutdown for its whole grace period.)"""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._shutting_down = False
        self._watches = 0
        self._no_watches = asyncio.Event()
        self._no_watches.set()

    async def set(self, service: str, status: int) -> None:
        if self._shutting_down:
            return
        self._status[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service, for good."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in self._status:
            self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        self._watches += 1
        self._no_watches.clear()
        try:
            last = None
            while True:
                changed = self._changed  # taken before reading, so no change is missed
                status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    continue  # it may have changed during the write (shutdown began): look again
                if self._shutting_down:
                    return
                await changed.wait()
        finally:
            self._watches -= 1
            if not self._watches:
                self._no_watches.set()

    async def watches_done(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every Watch stream has told its
        client NOT_SERVING and ended."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._no_watches.wait(), timeout)


#: Seconds a server's own wind-down (``RunningServer.stop(wind_down=...)``) gets after the grace to
#: finish what it ended (the coordinator: release sessions, send last messages) before gRPC cancels it;
#: the engine's session release is bounded by 5 s.
WIND_DOWN_MARGIN = 5.0


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    host: str
    service_names: list[str]
    #: the plaintext health-only server (``--health-port``), if any
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def stop(
        self,
        grace: float | None = 5.0,
        drain_delay: float = 0.0,
        wind_down: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        """Report NOT_SERVING, optionally wait for load balancers to notice,
        then stop accepting RPCs and give running ones ``grace`` seconds.

        ``wind_down(grace)``, if given, runs as the server stops accepting RPCs
        and must end the running ones within ``grace`` seconds, in its own way
        (the coordinator sends each stream a last message); gRPC cancels what
        is left :data:`WIND_DOWN_MARGIN` seconds later."""
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        await self.health.watches_done(timeout=1.0)
        if wind_down is None or grace is None:
            await self.server.stop(grace)
        else:
            stopping = asyncio.ensure_future(self.server.stop(grace + WIND_DOWN_MARGIN))
            try:
                await wind_down(grace)
            finally:
                await stopping
        if self.health_server is not None:
            await self.health_server.stop(0)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_server(
    register: Callable[[grpc.aio.Server], list[str]],
    host: str = "127.0.0.1",
    port: int = 0,
    policy: Policy | None = None,
) -> RunningServer:
    """Start a server; ``register`` adds the servicers and returns the full
    names of the services it added. Port 0 picks a free port."""
    policy = policy or Policy()
    interceptors = [*policy.interceptors(), *tracing.server_interceptors()]  # refused calls leave no trace
    server = grpc.aio.server(options=[*SERVER_OPTIONS, *policy.options()], interceptors=interceptors or None)
    names = register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bind = _bind(host, port)
    credentials = policy.security.grpc_credentials()
    try:
        bound = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {bind}: {exc}") from None
    health_server, health_port = None, None
    if policy.health_port is not None:
        # Health alone, plaintext and open: Kubernetes gRPC probes speak neither TLS nor tokens.
        health_server = grpc.aio.server(options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        try:
            health_port = health_server.add_insecure_port(_bind(host, policy.health_port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {_bind(host, policy.health_port)} (health): {exc}") from None
        await health_server.start()
    await server.start()
    return RunningServer(server, health_servicer, bound, host.strip("[]"), names, health_server, health_port)


async def serve_until_signal(
    running: RunningServer,
    grace: float = 5.0,
    drain_delay: float = 0.0,
    on_stop: Callable[[], object] | None = None,
    on_signal: Callable[[], None] | None = None,
    wind_down: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or the server terminates), then shut down
    gracefully: ``on_signal()`` at once, then :meth:`RunningServer.stop`
    (with ``wind_down``), then ``on_stop()``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def signalled() -> None:
        if not stop.is_set() and on_signal is not None:
            on_signal()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, signalled)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    waiter = asyncio.ensure_future(running.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if stop.is_set():
        log.info("shutting down", extra={"grace_seconds": grace, "address": running.address})
        await running.stop(grace, drain_delay, wind_down)
        if on_stop is not None:
            result = on_stop()
            if asyncio.iscoroutine(result):
                await result
    await waiter
    log.info("stopped", extra={"address": running.address})


def announce(path: str | None, address: str) -> None:
    """Write the bound address to ``path`` (atomically), for supervisors such
    as ``dsi up`` that start servers on port 0."""
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(address)
        os.replace(tmp, path)
