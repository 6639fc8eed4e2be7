"""Replica discovery (``--target dns:///NAME:PORT``) against changing replica
sets: local servers on loopback behind a resolver the test controls."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain.errors import InvalidArgument, Unavailable
from dsi.serving.server import start_server
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import DRAFTER, TARGET, GenerateInput
from services.coordinator.discovery import DnsResolver, build_coordinator, format_address, parse_dns
from services.coordinator.engine import Strategy
from services.drafter.service import register as register_drafter
from services.target.service import register as register_target
from tests.helpers import LOOPBACK, eventually, serve

T = "synthetic:vocab=200,seed=8,tpot_ms=5"
D = "synthetic:vocab=200,seed=8,tpot_ms=1,acceptance=0.7"


class FakeResolver:
    """Answers with whatever the test sets; counts the queries."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.fail = False
        self.queries = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.queries += 1
        if self.fail:
            raise OSError("temporary failure in name resolution")
        return list(self.answers.get(host, []))


async def start_targets(stack: AsyncExitStack, n: int, spec: str = T) -> list[tuple[LocalTarget, str]]:
    out = []
    for _ in range(n):
        target = LocalTarget(load_target_model(spec))
        srv = await stack.enter_async_context(serve(register_target(target)))
        out.append((target, srv.address))
    return out


async def start_drafter(stack: AsyncExitStack) -> str:
    drafter = LocalDrafter(load_drafter_model(D))
    srv = await stack.enter_async_context(serve(register_drafter(drafter)))
    return srv.address


async def generate(coordinator, n: int = 30, strategy: Strategy = Strategy.DSI) -> list[int]:
    out: list[int] = []
    async for o in coordinator.generate(GenerateInput(prompt_token_ids=[1, 2, 3], max_new_tokens=n, strategy=strategy)):
        out.extend(o.token_ids)
    return out


def test_parse_dns_names():
    assert parse_dns("127.0.0.1:5000") is None
    assert parse_dns("dns:///targets.dsi.svc.cluster.local:50051") == ("targets.dsi.svc.cluster.local", 50051)
    assert parse_dns("dns:///[::1]:7") == ("::1", 7)
    for bad in ("dns://8.8.8.8/name:1", "dns:///name", "dns:///name:http"):
        with pytest.raises(InvalidArgument):
            parse_dns(bad)
    assert format_address("::1", 5) == "[::1]:5" and format_address("127.0.0.1", 5) == "127.0.0.1:5"


async def test_dns_resolver_resolves_localhost():
    found = await DnsResolver().resolve("localhost", 4242)
    assert found and all(a.endswith(":4242") for a in found)
    assert set(found) <= {"127.0.0.1:4242", "[::1]:4242"}


async def test_replicas_are_added_and_drained_as_the_name_changes():
    resolver = FakeResolver()
    async with AsyncExitStack() as stack:
        (t1, a1), (_, a2), (t3, a3) = await start_targets(stack, 3)
        drafter = await start_drafter(stack)
        resolver.answers["targets"] = [a1, a2]
        coordinator = await build_coordinator(
            ["dns:///targets:50051"], [drafter], GrpcTarget, GrpcDrafter, timeout=5, resolver=resolver, interval=3600
        )
        stack.push_async_callback(coordinator.close)
        watcher = coordinator.watchers[0]
        assert sorted(p.address for p in coordinator.targets) == sorted([a1, a2])
        reference = await generate(coordinator, strategy=Strategy.NONSI)

        # A third replica appears: it is added and used.
        resolver.answers["targets"] = [a1, a2, a3]
        await watcher.refresh()
        assert sorted(p.address for p in coordinator.targets) == sorted([a1, a2, a3])
        assert coordinator.engine.sp_degree == 3
        assert await generate(coordinator) == reference
        assert t3.counters.forward_passes > 0, "the new replica got no work"

        # Replica 1 disappears in the middle of a generation: the generation
        # finishes, replica 1 gets no new work, and its client is closed.
        running = asyncio.ensure_future(generate(coordinator, n=150))
        await eventually(lambda: t1.counters.forward_passes > 0 or t1.sessions.busy > 0, timeout=5)
        resolver.answers["targets"] = [a2, a3]
        await watcher.refresh()
        assert sorted(p.address for p in coordinator.targets) == sorted([a2, a3])
        passes_at_removal = t1.counters.forward_passes
        out = await running
        assert len(out) == 150 and out[:30] == reference
        index = next(i for i, s in enumerate(coordinator.engine.targets.slots) if s.member.address == a1)
        slot = coordinator.engine.targets.slots[index]
        assert slot.draining and not slot.leases
        assert t1.counters.forward_passes <= passes_at_removal + 1  # at most the one already in flight
        before = t1.counters.forward_passes
        assert await generate(coordinator) == reference
        assert t1.counters.forward_passes == before, "a drained replica got new work"


async def test_periodic_refresh_and_dns_failures():
    resolver = FakeResolver()
    async with AsyncExitStack() as stack:
        (_, a1), (_, a2) = await start_targets(stack, 2)
        drafter = await start_drafter(stack)
        resolver.answers["t"] = [a1]
        coordinator = await build_coordinator(
            ["dns:///t:1"], [drafter], GrpcTarget, GrpcDrafter, timeout=5, resolver=resolver, interval=0.02
        )
        stack.push_async_callback(coordinator.close)
        resolver.answers["t"] = [a1, a2]
        await eventually(lambda: len(coordinator.targets) == 2, timeout=5)
        # A failing DNS server must not drain the replicas we know.
        resolver.fail = True
        queries = resolver.queries
        await eventually(lambda: resolver.queries > queries + 2, timeout=5)
        assert len(coordinator.targets) == 2
        resolver.fail = False
        resolver.answers["t"] = []
        await eventually(lambda: len(coordinator.targets) == 0, timeout=5)
        with pytest.raises(Unavailable, match="no target replica"):
            await generate(coordinator)


async def test_an_incompatible_replica_is_not_added():
    resolver = FakeResolver()
    async with AsyncExitStack() as stack:
        ((_, good),) = await start_targets(stack, 1)
        ((_, other_vocab),) = await start_targets(stack, 1, "synthetic:vocab=201")
        drafter = await start_drafter(stack)
        resolver.answers["t"] = [good]
        coordinator = await build_coordinator(
            ["dns:///t:1"], [drafter], GrpcTarget, GrpcDrafter, timeout=5, resolver=resolver, interval=3600
        )
        stack.push_async_callback(coordinator.close)
        resolver.answers["t"] = [good, other_vocab]
        await coordinator.watchers[0].refresh()
        assert [p.address for p in coordinator.targets] == [good]


async def test_a_vanished_replica_is_found_on_failure_and_dropped():
    """A replica dies without notice: the failing generation gets UNAVAILABLE
    naming it and pokes the watcher, which re-resolves at once."""
    resolver = FakeResolver()
    async with AsyncExitStack() as stack:
        drafter = await start_drafter(stack)
        target = LocalTarget(load_target_model(T))
        dying = await start_server(register_target(target), LOOPBACK, 0)
        ((_, survivor),) = await start_targets(stack, 1)
        resolver.answers["t"] = [dying.address]
        coordinator = await build_coordinator(
            ["dns:///t:1"], [drafter], GrpcTarget, GrpcDrafter, timeout=5, resolver=resolver, interval=3600
        )
        stack.push_async_callback(coordinator.close)
        await dying.stop(grace=0)
        resolver.answers["t"] = [survivor]
        with pytest.raises(Unavailable, match=dying.address):
            await generate(coordinator, strategy=Strategy.NONSI)
        await eventually(lambda: [p.address for p in coordinator.targets] == [survivor], timeout=5)
        assert len(await generate(coordinator)) == 30


async def test_drafters_can_be_discovered_too():
    resolver = FakeResolver()
    async with AsyncExitStack() as stack:
        ((_, target),) = await start_targets(stack, 1)
        d1, d2 = await start_drafter(stack), await start_drafter(stack)
        resolver.answers["d"] = [d1]
        coordinator = await build_coordinator(
            [target], ["dns:///d:1"], GrpcTarget, GrpcDrafter, timeout=5, resolver=resolver, interval=3600
        )
        stack.push_async_callback(coordinator.close)
        resolver.answers["d"] = [d1, d2]
        await coordinator.watchers[0].refresh()
        assert sorted(p.address for p in coordinator.peers(DRAFTER).values()) == sorted([d1, d2])
        assert len(coordinator.peers(TARGET)) == 1
        assert len(await generate(coordinator, strategy=Strategy.SI)) == 30


async def test_start_waits_for_the_name_to_have_addresses():
    resolver = FakeResolver()
    with pytest.raises(Unavailable, match="dns:///nobody:1"):
        await build_coordinator(["dns:///nobody:1"], [], GrpcTarget, GrpcDrafter, timeout=0.3, resolver=resolver)
