"""Replica discovery: ``--target dns:///NAME:PORT``.

A Kubernetes headless Service answers a DNS query with one address per ready
pod. A :class:`Watcher` resolves the name, keeps one client per address in the
coordinator's pool, re-resolves every ``interval`` seconds and whenever a call
fails with UNAVAILABLE, adds new replicas and drains removed ones (requests in
flight on a removed replica finish; it just gets no new ones).

The resolver is pluggable (:class:`Resolver`) so tests can change the answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dsi.domain.errors import DsiError, InvalidArgument, Unavailable
from services.coordinator.coordinator import DRAFTER, TARGET, Codec, Coordinator, Defaults

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"


def parse_dns(spec: str) -> tuple[str, int] | None:
    """``dns:///host:port`` → (host, port); None for a plain address."""
    if not spec.startswith("dns:"):
        return None
    if not spec.startswith(DNS_PREFIX):
        raise InvalidArgument(f"{spec!r}: use dns:///NAME:PORT (no DNS authority)")
    rest = spec[len(DNS_PREFIX) :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"{spec!r}: expected dns:///NAME:PORT")
    return host.strip("[]"), int(port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address (``ip:port``) behind the name; raises OSError on failure."""
        ...


class DnsResolver:
    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({format_address(str(info[4][0]), port) for info in infos})


class Watcher:
    """Keeps the replicas behind one DNS name in a coordinator's pool."""

    def __init__(
        self,
        coordinator: Coordinator,
        kind: str,
        host: str,
        port: int,
        make_client: Callable[..., Any],
        resolver: Resolver,
        interval: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.coordinator = coordinator
        self.kind = kind
        self.host, self.port = host, port
        self.make_client = make_client
        self.resolver = resolver
        self.interval = interval
        self.connect_timeout = connect_timeout
        self.members: dict[str, int] = {}  # address -> pool index
        self._poke = asyncio.Event()
        self._stopped = False
        self._task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return f"{DNS_PREFIX}{self.host}:{self.port}"

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        # A flag, not Task.cancel(): on Python < 3.12 a cancellation that races
        # with asyncio.wait_for's timeout can be swallowed.
        self._stopped = True
        self._poke.set()
        if self._task is not None:
            await self._task

    def poke(self) -> None:
        """Re-resolve now (a call failed)."""
        self._poke.set()

    async def _run(self) -> None:
        while not self._stopped:
            waiter = asyncio.ensure_future(self._poke.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.interval)
            finally:
                waiter.cancel()
            if self._stopped:
                return
            self._poke.clear()
            try:
                await self.refresh()
            except Exception:  # keep watching whatever happened
                log.exception("refreshing %s failed", self.name)

    async def refresh(self) -> None:
        try:
            found = set(await self.resolver.resolve(self.host, self.port))
        except OSError as exc:  # a DNS hiccup must not drain everything
            log.warning("resolving %s failed: %s", self.name, exc)
            return
        for address in sorted(found - set(self.members)):
            client = self.make_client(address, server_name=self.host)
            try:
                self.members[address] = await self.coordinator.add_peer(
                    self.kind, address, client, self.connect_timeout
                )
            except DsiError as exc:  # unreachable, another vocabulary, refused credentials ...
                log.warning("not adding %s %s: %s", self.kind, address, exc)
                await client.close()
        for address in sorted(set(self.members) - found):
            self.coordinator.remove_peer(self.kind, self.members.pop(address))


async def resolve_initial(resolver: Resolver, host: str, port: int, timeout: float) -> list[str]:
    """Resolve until the name has at least one address or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.1
    while True:
        try:
            found = await resolver.resolve(host, port)
        except OSError as exc:
            found, error = [], str(exc)
        else:
            error = "no addresses"
        if found:
            return found
        if loop.time() + delay > deadline:
            raise Unavailable(f"{DNS_PREFIX}{host}:{port} is unavailable: {error} within {timeout:g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def build_coordinator(
    target_specs: Sequence[str],
    drafter_specs: Sequence[str],
    make_target: Callable[..., Any],
    make_drafter: Callable[..., Any],
    codec: Codec | None = None,
    defaults: Defaults | None = None,
    timeout: float = 60.0,
    resolver: Resolver | None = None,
    interval: float = 10.0,
) -> Coordinator:
    """A coordinator for plain ``HOST:PORT`` addresses and ``dns:///NAME:PORT``
    names; names are then watched for changes.

    ``make_target(address)`` / ``make_drafter(address)`` make a client; for
    the replicas of a name they are called with ``server_name=NAME`` too (the
    name TLS certificates are checked for)."""
    resolver = resolver or DnsResolver()
    names: list[tuple[str, str, int, list[str]]] = []
    endpoints: dict[str, list[tuple[str, Any]]] = {TARGET: [], DRAFTER: []}
    for kind, specs, make in ((TARGET, target_specs, make_target), (DRAFTER, drafter_specs, make_drafter)):
        for spec in specs:
            dns = parse_dns(spec)
            addresses = [spec] if dns is None else await resolve_initial(resolver, *dns, timeout)
            if dns is not None:
                names.append((kind, *dns, addresses))
            # A name's replicas are dialled by IP address; their TLS certificates carry the name.
            endpoints[kind] += [(a, make(a) if dns is None else make(a, server_name=dns[0])) for a in addresses]
    coordinator = await Coordinator.connect(endpoints[TARGET], endpoints[DRAFTER], codec, defaults, timeout)
    for kind, host, port, addresses in names:
        make = make_target if kind == TARGET else make_drafter
        watcher = Watcher(coordinator, kind, host, port, make, resolver, interval, min(timeout, 10.0))
        by_address = {p.address: i for i, p in coordinator.peers(kind).items()}
        watcher.members = {a: by_address[a] for a in addresses}
        coordinator.watchers.append(watcher)
        watcher.start()
    return coordinator
