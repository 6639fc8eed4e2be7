"""Replica choice: load, measured speed, cache affinity, draining."""

from __future__ import annotations

import asyncio

import pytest

from dsi.domain.errors import Unavailable
from services.coordinator import pool as pool_module
from services.coordinator.pool import SPECULATION_SHARE, Pool


def record(pool: Pool, replica: int, seconds: float) -> None:
    """One completed request of ``seconds`` on ``replica``."""
    lease = pool.acquire_on(replica)
    lease.started = pool_module.clock() - seconds
    pool.release(lease, completed=True)


def test_idle_replicas_are_chosen_fastest_first():
    pool = Pool(["slow", "fast", "also-fast"])
    record(pool, 0, 0.050)
    record(pool, 1, 0.030)
    record(pool, 2, 0.033)  # within 20% of the fastest: as fast
    assert pool.latency(0) == pytest.approx(0.050, rel=0.05)
    chosen = {pool.acquire_idle(lambda: 1).replica for _ in range(2)}
    assert chosen == {1, 2}, "a slow replica was chosen while fast ones were idle"
    assert pool.acquire_idle(lambda: 1).replica == 0  # the slow one only when the fast ones are busy
    assert pool.acquire_idle(lambda: 1) is None


def test_cancelled_requests_do_not_count_as_latency_samples():
    pool = Pool(["a"])
    lease = pool.acquire_on(0)
    lease.started = pool_module.clock() - 5.0
    pool.release(lease)  # not completed (cancelled)
    assert pool.latency(0) == 0.0


def test_among_equally_fast_replicas_the_one_caching_most_is_chosen():
    pool = Pool(["a", "b", "c"])
    for i in range(3):
        record(pool, i, 0.03)
    cached = {0: 10, 1: 40, 2: 25}
    lease = pool.acquire_idle(lambda: 1, affinity=lambda i: cached[i])
    assert lease.replica == 1
    lease2, _ = pool.acquire_frontier(affinity=lambda i: cached[i])
    assert lease2.replica == 2


def test_least_loaded_beats_speed_and_affinity():
    pool = Pool(["fast", "slow"])
    record(pool, 0, 0.01)
    record(pool, 1, 0.10)
    busy = pool.acquire_on(0)
    assert pool.least_loaded() == 1
    pool.release(busy)
    assert pool.least_loaded() == 0


def test_draining_replicas_get_no_new_work_and_close_when_idle():
    closed: list[int] = []
    pool = Pool(["a", "b"])
    running = pool.acquire_on(0)
    pool.drain(0, lambda: closed.append(0))
    assert len(pool) == 1 and not closed
    assert {pool.acquire_idle(lambda: 1).replica} == {1}
    pool.release(running)
    assert closed == [0]
    pool.drain(1)
    with pytest.raises(Unavailable, match="no replica"):
        pool.least_loaded()


async def test_a_failed_replica_gets_no_requests_until_its_health_probe_answers(monkeypatch):
    monkeypatch.setattr(pool_module, "PROBE_FIRST", 0.01)
    healthy = {"a": False, "b": True}
    probed: list[str] = []

    async def probe(member: str) -> None:
        probed.append(member)
        if not healthy[member]:
            raise Unavailable(f"{member} is unavailable")

    pool = Pool(["a", "b"], probe=probe)
    pool.release(pool.acquire_on(0), unreachable=True)
    assert not pool.is_active(0) and pool.active() == [1]
    for _ in range(500):  # bounded: a few failed probes, with back-off
        if len(probed) >= 3:
            break
        await asyncio.sleep(0.01)
    assert probed[:3] == ["a", "a", "a"] and not pool.is_active(0)  # still down: no request went to it
    assert {pool.acquire_idle(lambda: 1).replica} == {1}
    healthy["a"] = True
    for _ in range(500):
        if pool.is_active(0):
            break
        await asyncio.sleep(0.01)
    assert pool.is_active(0) and pool.slots[0].failures == 0
    await pool.close()


async def test_with_every_replica_down_the_error_names_them():
    async def probe(member: str) -> None:
        raise Unavailable("down")

    pool = Pool(["a", "b"], "target replica", probe=probe)
    for i in (0, 1):
        pool.release(pool.acquire_on(i), unreachable=True)
    with pytest.raises(
        Unavailable, match="no target replica is available: target replica 0, target replica 1 not reachable"
    ):
        pool.least_loaded()
    await pool.close()
    assert all(s.probe is None or s.probe.done() for s in pool.slots)


# --- batching replicas (issue 17) ---------------------------------------------------


def test_a_batching_replica_takes_frontier_steps_up_to_its_capacity_without_preempting() -> None:
    pool: Pool[str] = Pool(["a"])
    pool.set_capacity(0, 4)
    preempted: list[int] = []
    spec = pool.acquire_idle(depth=lambda: 3, preempt=lambda: preempted.append(1))
    assert spec is not None  # idle: speculation may go
    fronts = [pool.acquire_frontier()[0] for _ in range(3)]
    assert not preempted and pool.in_flight(0) == 4  # joined the batch
    assert pool.headroom(0) == 0.0
    lease, took = pool.acquire_frontier()  # full: now the speculative one is preempted
    assert took and preempted == [1]
    for x in [*fronts, lease]:
        pool.release(x)
    assert pool.headroom(0) == 1.0


def test_speculation_uses_only_the_spare_share_of_a_batch() -> None:
    pool: Pool[str] = Pool(["a", "b"])
    for i in (0, 1):
        pool.set_capacity(i, 8)
    share = int(8 * SPECULATION_SHARE)
    fronts = [pool.acquire_frontier()[0] for _ in range(2 * share - 2)]  # leaves one spare slot per replica
    specs = [pool.acquire_idle(depth=lambda: 1) for _ in range(3)]
    assert specs[0] is not None and specs[1] is not None and specs[2] is None
    assert pool.in_flight(0) == pool.in_flight(1) == share
    for x in fronts:
        pool.release(x)
    assert pool.acquire_idle(depth=lambda: 1) is not None


def test_without_batching_speculation_needs_an_idle_replica() -> None:
    pool: Pool[str] = Pool(["a"])
    pool.acquire_frontier()
    assert pool.acquire_idle(depth=lambda: 1) is None
    assert pool.headroom(0) == 1.0  # a queue, not a batch: SI keeps its lookahead


def test_a_replica_whose_request_was_cancelled_is_chosen_last_until_its_pass_would_have_ended(monkeypatch):
    """A forward pass runs to its end on the device, cancelled or not: until
    the pass it started would be done, the replica is the last choice (even
    over one caching less of the request), and still a choice when it is the
    only one idle; afterwards the cache decides again."""
    now = [100.0]
    monkeypatch.setattr(pool_module, "clock", lambda: now[0])
    caches_a = {0: 50, 1: 0}.__getitem__
    pool = Pool(["a", "b"])
    for i in (0, 1):
        record(pool, i, 0.030)
    lease = pool.acquire_on(0)
    now[0] += 0.010
    pool.release(lease, cancelled=True)  # 10 ms into a ~30 ms pass
    first, second = pool.acquire_idle(lambda: 1, affinity=caches_a), pool.acquire_idle(lambda: 1, affinity=caches_a)
    assert (first.replica, second.replica) == (1, 0)
    pool.release(first)
    pool.release(second)
    now[0] += 0.021  # the cancelled pass would have ended
    assert pool.acquire_idle(lambda: 1, affinity=caches_a).replica == 0


def test_a_cancelled_pass_is_expected_to_run_as_long_as_its_size_takes_there(monkeypatch):
    """On a replica whose passes cost more per token (as it reports them), a
    cancelled pass of 9 tokens keeps it busy for its own time (54 ms), not
    the average request's (30 ms); one of a single token for the average."""
    now = [100.0]
    monkeypatch.setattr(pool_module, "clock", lambda: now[0])
    caches_a = {0: 50, 1: 0}.__getitem__
    pool = Pool(["a", "b"])
    for i in (0, 1):
        record(pool, i, 0.030)  # the average request: 30 ms
        for tokens in (1, 9, 1, 9):
            pool.measured_pass(i, tokens, 0.030 + 0.003 * (tokens - 1))  # 30 ms + 3 ms per token beyond one
    for tokens, busy_for in ((9, 0.054), (1, 0.030)):
        lease = pool.acquire_on(0)
        lease.tokens = tokens
        now[0] += 0.010
        pool.release(lease, cancelled=True)
        now[0] += busy_for - 0.010 - 0.002  # just before it would end: the other one, though it caches less
        other = pool.acquire_idle(lambda: 1, affinity=caches_a)
        assert other is not None and other.replica == 1, tokens
        pool.release(other)
        now[0] += 0.004  # just after: the cache decides again
        back = pool.acquire_idle(lambda: 1, affinity=caches_a)
        assert back is not None and back.replica == 0, tokens
        pool.release(back)


def test_expected_answers_count_a_cancelled_pass_the_replica_still_runs(monkeypatch):
    """A request's expected answer: its size's time on its replica from when
    its pass starts, after any cancelled pass the replica still runs; the
    idle replica that would answer a request soonest, likewise (a busy one
    never)."""
    now = [100.0]
    monkeypatch.setattr(pool_module, "clock", lambda: now[0])
    pool = Pool(["a", "b", "c"])
    for i in (0, 1, 2):
        record(pool, i, 0.030)
        for tokens in (1, 17, 1, 17):
            pool.measured_pass(i, tokens, 0.030 + 0.003 * (tokens - 1))
    one_token = lambda i: 1  # noqa: E731
    stale = pool.acquire_on(0)  # a cancelled 17-token pass on replica 0: busy for 78 ms
    stale.tokens = 17
    pool.release(stale, cancelled=True)
    chunk = pool.acquire_idle(lambda: 1)  # a 17-token chunk on replica 1 (replica 0 is chosen last)
    assert chunk is not None and chunk.replica == 1
    chunk.tokens = 17
    assert pool.expected_end(chunk) == pytest.approx(100.078)
    now[0] += 0.020
    assert pool.soonest_idle(one_token) == (2, pytest.approx(100.050))  # not replica 0, busy until 100.078
    assert pool.soonest_idle(lambda i: 25 if i == 2 else 1) == (0, pytest.approx(100.108))  # 102 ms there
    step = pool.acquire_on(2)
    assert pool.soonest_idle(one_token) == (0, pytest.approx(100.108))
    queued = pool.acquire_on(0)  # starts after the cancelled pass
    queued.tokens = 1
    assert pool.expected_end(queued) == pytest.approx(100.108)
    assert pool.soonest_idle(one_token) is None
    pool.release(step)


async def test_close_ends_the_health_probes_even_when_a_cancellation_is_lost(monkeypatch):
    """Python 3.11's wait_for() drops a cancellation that comes as the probe
    it waits for ends (it raises the probe's error instead): the probe loop
    went on (every 5 s), and close(), and the test that called it, waited for
    ever (seen once in CI, in test_failover). Here wait_for() always does
    that; close() still returns, and a member marked down after it gets no
    probe."""
    monkeypatch.setattr(pool_module, "PROBE_FIRST", 0.01)

    async def probe(member: str) -> None:
        await asyncio.sleep(0.02)
        raise Unavailable(f"{member} is unavailable")

    async def lossy_wait_for(awaitable, timeout):
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise Unavailable("the probe ended as it was cancelled") from None

    monkeypatch.setattr(pool_module.asyncio, "wait_for", lossy_wait_for)
    pool = Pool(["a", "b"], probe=probe)
    pool.release(pool.acquire_on(0), unreachable=True)
    await asyncio.sleep(0.05)  # probing
    closing = asyncio.ensure_future(pool.close())
    for _ in range(200):  # bounded: 2 s
        if closing.done():
            break
        await asyncio.sleep(0.01)
    assert closing.done(), "close() waits for a probe loop that goes on"
    pool.release(pool.acquire_on(1), unreachable=True)
    assert pool.slots[1].down and pool.slots[1].probe is None
