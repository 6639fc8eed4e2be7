"""SessionStore (dsi/domain/sessions.py): bounded, idle-limited per-session state with
in-order access per session."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack

import pytest

from dsi.domain.errors import Cancelled, ResourceExhausted
from dsi.domain.sessions import SessionStore
from tests.helpers import eventually


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A store whose states are numbered objects, with a record of drops."""

    def __init__(self, max_sessions: int = 4, idle_timeout: float = 600.0) -> None:
        self.clock = FakeClock()
        self.created: list[dict[str, int]] = []
        self.dropped: list[dict[str, int]] = []
        self.store: SessionStore[dict[str, int]] = SessionStore(
            self.factory, max_sessions, idle_timeout, clock=self.clock, on_drop=self.dropped.append
        )

    def factory(self) -> dict[str, int]:
        state = {"n": len(self.created)}
        self.created.append(state)
        return state

    def users(self, session_id: str) -> int:
        return self.store._entries[session_id].users

    async def touch(self, session_id: str) -> dict[str, int]:
        async with self.store.use(session_id) as state:
            return state


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Holder:
    """A task that holds a session until told to let go."""

    def __init__(self, h: Harness, session_id: str) -> None:
        self.inside = asyncio.Event()
        self.go = asyncio.Event()
        self.state: dict[str, int] | None = None
        self.task = asyncio.create_task(self._run(h, session_id))

    async def _run(self, h: Harness, session_id: str) -> None:
        async with h.store.use(session_id) as state:
            self.state = state
            self.inside.set()
            await self.go.wait()

    async def finish(self) -> None:
        self.go.set()
        await self.task


def test_max_sessions_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SessionStore(dict, max_sessions=0)


async def test_state_is_kept_per_session_and_reused() -> None:
    h = Harness()
    a1 = await h.touch("a")
    b = await h.touch("b")
    a2 = await h.touch("a")
    assert a1 is a2, "the same session id must get its state back"
    assert a1 is not b
    assert len(h.store) == 2 and "a" in h.store and "b" in h.store and "c" not in h.store
    assert len(h.created) == 2, "the factory runs once per session"


async def test_bounded_count_evicts_least_recently_used_idle_session() -> None:
    h = Harness(max_sessions=2)
    a = await h.touch("a")
    b = await h.touch("b")
    await h.touch("a")  # a is now more recent than b
    await h.touch("c")
    assert len(h.store) == 2, "the count stays bounded"
    assert "b" not in h.store and "a" in h.store and "c" in h.store, "the least recently used session goes"
    assert h.dropped == [b], "on_drop receives the evicted state"
    assert h.store.evicted == 1
    await h.touch("d")
    assert "a" not in h.store and h.dropped == [b, a]
    assert h.store.evicted == 2


async def test_busy_sessions_are_not_evicted_for_room() -> None:
    h = Harness(max_sessions=2)
    holder = Holder(h, "a")  # a is the least recently used, but busy
    await holder.inside.wait()
    await h.touch("b")
    await h.touch("c")
    assert "a" in h.store and "b" not in h.store and "c" in h.store, "the idle session is evicted, not the busy one"
    await holder.finish()
    assert h.dropped == [h.created[1]]


async def test_all_busy_raises_resource_exhausted_and_leaves_nothing_behind() -> None:
    h = Harness(max_sessions=2)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(h.store.use("a"))
        await stack.enter_async_context(h.store.use("b"))
        assert h.store.busy == 2
        with pytest.raises(ResourceExhausted, match="busy"):
            async with h.store.use("c"):
                pytest.fail("a third session must not be admitted")
        assert "c" not in h.store and len(h.store) == 2
        assert len(h.created) == 2, "no state is built for a refused session"
        assert h.dropped == [], "busy sessions are never dropped"
        # A busy session itself is still usable (it waits its turn), it does not need room.
        assert h.store.is_busy("a")
    assert h.store.busy == 0
    await h.touch("c")
    assert "c" in h.store, "once a session is idle there is room again"


async def test_idle_timeout_with_fake_clock() -> None:
    h = Harness(max_sessions=10, idle_timeout=60.0)
    a = await h.touch("a")  # last used at t=0
    h.clock.now = 30.0
    b = await h.touch("b")  # last used at t=30
    h.clock.now = 60.0
    assert h.store.evict_idle() == 0, "exactly the timeout is not yet past it"
    h.clock.now = 61.0
    assert h.store.evict_idle() == 1
    assert "a" not in h.store and "b" in h.store and h.dropped == [a]
    h.clock.now = 200.0
    await h.touch("c")  # creating a session sweeps expired ones even when the store is not full
    assert "b" not in h.store and h.dropped == [a, b]
    assert h.store.evicted == 2
    assert "c" in h.store


async def test_idle_timeout_counts_from_the_end_of_the_last_request() -> None:
    h = Harness(max_sessions=10, idle_timeout=60.0)
    await h.touch("a")
    h.clock.now = 50.0
    await h.touch("a")
    h.clock.now = 100.0  # 100 s since creation, 50 s since last use
    assert h.store.evict_idle() == 0 and "a" in h.store


async def test_busy_session_never_times_out() -> None:
    h = Harness(max_sessions=10, idle_timeout=1.0)
    holder = Holder(h, "a")
    await holder.inside.wait()
    h.clock.now = 1000.0
    assert h.store.evict_idle() == 0
    assert "a" in h.store and h.dropped == []
    await holder.finish()
    h.clock.now = 1000.5
    assert h.store.evict_idle() == 0, "idle for 0.5 s only"
    h.clock.now = 1002.0
    assert h.store.evict_idle() == 1 and h.dropped == [holder.state]


async def test_requests_of_one_session_run_one_at_a_time_in_arrival_order() -> None:
    h = Harness()
    events: list[tuple[str, int]] = []
    active = 0
    peak = 0

    async def request(i: int) -> None:
        nonlocal active, peak
        async with h.store.use("s"):
            active += 1
            peak = max(peak, active)
            events.append(("start", i))
            for _ in range(10 - 2 * i):  # earlier requests take longer
                await asyncio.sleep(0)
            events.append(("end", i))
            active -= 1

    tasks = [asyncio.create_task(request(i)) for i in range(5)]
    await asyncio.gather(*tasks)
    assert peak == 1, "two requests of one session overlapped"
    assert events == [(kind, i) for i in range(5) for kind in ("start", "end")], f"out of order: {events}"
    assert h.users("s") == 0 and not h.store.is_busy("s")


async def test_different_sessions_run_concurrently() -> None:
    h = Harness()
    a = Holder(h, "a")
    b = Holder(h, "b")
    await asyncio.wait_for(asyncio.gather(a.inside.wait(), b.inside.wait()), 2.0)
    assert h.store.busy == 2
    await a.finish()
    await b.finish()
    assert h.store.busy == 0


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    h = Harness()
    holder = Holder(h, "s")
    await holder.inside.wait()
    reached = []

    async def waiter() -> None:
        async with h.store.use("s"):
            reached.append(True)

    w = asyncio.create_task(waiter())
    await settle()
    assert h.users("s") == 2, "the waiter is counted while it waits"
    w.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await w
    assert w.cancelled()
    assert h.users("s") == 1, "the cancelled waiter no longer counts"
    await holder.finish()
    assert h.users("s") == 0 and not h.store.is_busy("s") and h.store.busy == 0
    assert reached == [], "the cancelled waiter never ran"
    # The lock is free: the next request gets in at once, with the same state.
    state = await asyncio.wait_for(h.touch("s"), 1.0)
    assert state is holder.state
    assert h.dropped == []


async def test_cancelled_holder_releases_the_session() -> None:
    h = Harness()
    holder = Holder(h, "s")
    await holder.inside.wait()
    nxt = asyncio.create_task(h.touch("s"))
    await settle()
    assert not nxt.done(), "the second request waits for the first"
    holder.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holder.task
    assert await asyncio.wait_for(nxt, 1.0) is holder.state
    assert h.users("s") == 0


async def test_exception_in_a_request_releases_the_session() -> None:
    h = Harness()
    with pytest.raises(RuntimeError, match="boom"):
        async with h.store.use("s"):
            raise RuntimeError("boom")
    assert h.users("s") == 0 and not h.store.is_busy("s")
    await asyncio.wait_for(h.touch("s"), 1.0)


async def test_release_of_an_idle_session_drops_it() -> None:
    h = Harness()
    s = await h.touch("s")
    assert h.store.release("s") is True
    assert "s" not in h.store and len(h.store) == 0
    assert h.dropped == [s], "on_drop is called on release"
    again = await h.touch("s")
    assert again is not s, "a released session id starts over with a fresh state"
    assert h.store.release("s") is True
    assert h.store.release("s") is False, "a second release finds nothing"
    assert h.store.release("never-seen") is False
    assert h.store.evicted == 0, "a release is not an eviction"


async def test_release_of_a_busy_session_drops_it_when_its_last_user_finishes() -> None:
    h = Harness()
    holder = Holder(h, "s")
    await holder.inside.wait()
    queued = Holder(h, "s")  # waits for the first request
    await settle()
    assert not queued.inside.is_set()
    assert h.store.release("s") is True
    assert h.store.release("s") is False, "already released"
    assert "s" in h.store and h.dropped == [], "not dropped while in use"
    await holder.finish()
    await asyncio.wait_for(queued.inside.wait(), 1.0)
    assert queued.state is holder.state, "the queued request runs on the released session's state"
    assert h.dropped == [] and "s" in h.store, "a queued request still holds the session"
    await queued.finish()
    assert "s" not in h.store
    assert h.dropped == [holder.state], "dropped exactly once, after the last user"


async def test_release_then_reuse_of_a_busy_session_still_drops_the_old_state() -> None:
    h = Harness()
    holder = Holder(h, "s")
    await holder.inside.wait()
    assert h.store.release("s") is True
    fresh = await h.touch("s")
    assert fresh is not holder.state, "a released id starts over"
    await holder.finish()
    assert holder.state in h.dropped, "every state the store created must reach on_drop once it is unused"


async def test_sweeper_evicts_idle_sessions_of_a_quiet_server() -> None:
    dropped: list[object] = []
    store: SessionStore[object] = SessionStore(object, max_sessions=4, idle_timeout=0.02, on_drop=dropped.append)
    async with store.use("a"):
        pass
    sweeper = asyncio.ensure_future(store.sweep_forever(0.01))
    try:
        await eventually(lambda: len(store) == 0, timeout=2.0)
    finally:
        sweeper.cancel()
    assert len(dropped) == 1 and store.evicted == 1


async def test_a_release_that_overtakes_the_request_creating_the_session_refuses_that_request() -> None:
    """A client cancels a call on its stream, then releases the session by
    another call: the release may be read first. The late request must not
    build a state that nobody will release."""
    h = Harness(max_sessions=2)
    assert h.store.release("s") is False, "nothing to release yet"
    with pytest.raises(Cancelled, match="released before"):
        await h.touch("s")
    assert "s" not in h.store and h.created == [], "nothing created"
    other = await h.touch("t")
    assert other is h.created[0], "other sessions are unaffected"
    h.clock.now += h.store.released_ahead_s + 1
    assert await h.touch("s") is h.created[1], "remembered for a while only: the id can be used again"


async def test_releases_ahead_are_remembered_within_a_bound() -> None:
    h = Harness(max_sessions=2)
    for i in range(100):
        h.store.release(f"s{i}")
    assert len(h.store._released_ahead) == 8, "at most four per session the store can hold"
    with pytest.raises(Cancelled):
        await h.touch("s99")
    assert await h.touch("s0") is h.created[0], "the oldest were forgotten"
    h.clock.now += h.store.released_ahead_s + 1
    h.store.release("fresh")
    assert list(h.store._released_ahead) == ["fresh"], "expired ones go as new ones come"
