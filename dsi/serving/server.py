"""Server bootstrap shared by the three services: a grpc.aio server with
standard health checking and reflection, and graceful shutdown on signals
(health NOT_SERVING first, then ``server.stop(grace)``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dsi.serving import tracing

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port already in use is an error, not a silent share
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
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


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    host: str
    service_names: list[str]

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = 5.0, drain_delay: float = 0.0) -> None:
        """Report NOT_SERVING, optionally wait for load balancers to notice,
        then stop accepting RPCs and give running ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        await self.health.watches_done(timeout=1.0)
        await self.server.stop(grace)


async def start_server(
    register: Callable[[grpc.aio.Server], list[str]], host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Start a server; ``register`` adds the servicers and returns the full
    names of the services it added. Port 0 picks a free port."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=tracing.server_interceptors() or None)
    names = register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bind = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(bind)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {bind}: {exc}") from None
    await server.start()
    return RunningServer(server, health_servicer, bound, host.strip("[]"), names)


async def serve_until_signal(
    running: RunningServer, grace: float = 5.0, drain_delay: float = 0.0, on_stop: Callable[[], object] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (or the server terminates), then shut down
    gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    waiter = asyncio.ensure_future(running.server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if stop.is_set():
        log.info("shutting down", extra={"grace_seconds": grace, "address": running.address})
        await running.stop(grace, drain_delay)
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
