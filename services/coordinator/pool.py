"""Replica pools shared by every generation of a coordinator.

A pool tracks the requests each instance is serving. Speculative
verifications go only to idle target replicas (so they never queue behind
other work); a frontier step (the one that guarantees progress) goes to an
idle replica, else preempts the speculative verification that is furthest
ahead of its own frontier, else queues on the least loaded replica.

Among idle replicas the pool prefers the fastest (by measured latency, so
mixed hardware is used well), then the one that already caches most of the
request (fewer tokens to prefill), then the one used longest ago.

Membership can change while requests run (replica discovery): a new member
is used at once; a removed member is *drained*: it gets no new requests, its
running ones finish, and ``on_drained`` runs when the last one is released.
Member indices are never reused, so a lease always names its member.

A member whose call failed (unreachable, no answer in time) is *down*: it gets
no requests until a health probe (its ``info()``, the Info RPC, over the same
channel and credentials) answers, tried with back-off (0.25 s doubling to 5 s).
A client's request is never the probe.

**Batching replicas** (issue 17). A member that runs up to ``capacity``
requests in one forward pass (its ``--max-batch``) is not full when it is
busy: another request costs it only a small part of a pass. Frontier steps
may fill it up to its capacity before anyone is preempted; speculative
verifications only use the *spare* part, below ``SPECULATION_SHARE`` of it.
So speculation never delays frontier steps by more than that many extra
requests per pass, and as load grows it shrinks by itself: once frontier
steps fill that share, a generation speculates no more than non-SI does.
With capacity 1 (no batching) this is the old rule: speculation on idle
replicas only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from dsi.domain.errors import Unavailable
from services.coordinator.costline import Line

T = TypeVar("T")

log = logging.getLogger(__name__)


SAME_SPEED = 1.2  # replicas within 20% of the fastest count as equally fast
EWMA = 0.2  # weight of a new latency sample
PROBE_FIRST, PROBE_MAX = 0.25, 5.0  # seconds between health probes of a member that is down (doubling)
PROBE_TIMEOUT = 2.0  # seconds a probe may take
SPECULATION_SHARE = 0.5  # of a batching replica's capacity, what speculative verifications may use


def clock() -> float:
    """Seconds on the running event loop's clock (virtual in ``dsi simulate
    --engine``), or monotonic seconds outside a loop: what latencies are
    measured with."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _frontier() -> int:
    return 0


@dataclass(eq=False)
class Lease:
    """One request in flight on one replica."""

    replica: int
    #: 0 for a frontier step; otherwise how far ahead of its generation's
    #: frontier the verification starts now (larger = more speculative).
    depth: Callable[[], int]
    #: Called when the pool takes the replica away for a frontier step.
    preempt: Callable[[], None] | None = None
    started: float = 0.0
    #: When its pass is expected to start: ``started``, or later if the replica still runs a cancelled pass.
    runs_from: float = 0.0
    released: bool = False
    #: Tokens its request has the replica compute (0: not known): how long its pass runs.
    tokens: int = 0


@dataclass
class _Slot(Generic[T]):
    member: T
    leases: set[Lease] = field(default_factory=set)
    served: int = 0
    draining: bool = False
    on_drained: Callable[[], object] | None = None
    latency: float = 0.0  # smoothed seconds per completed request
    down: bool = False  # a call failed; no requests until a probe answers
    failures: int = 0  # calls that failed since it was last known good
    probe: asyncio.Task | None = None
    capacity: int = 1  # requests it runs in one forward pass (batching)
    #: Until when (clock) it likely still runs a pass that was cancelled: a
    #: started forward pass runs to its end on the device, cancelled or not.
    busy_until: float = 0.0
    #: A pass's seconds by the tokens it computes, as the replica reports them (its own compute
    #: time: no queue, no network), so that a cancelled pass of many drafts is not taken to end as
    #: soon as the average request does.
    pass_cost: Line = field(default_factory=Line)

    @property
    def spare(self) -> bool:
        """Room for a speculative verification (idle, for a non-batching member)."""
        return len(self.leases) < max(1, int(self.capacity * SPECULATION_SHARE))

    @property
    def has_room(self) -> bool:
        """Room in its next pass: a frontier step joins it at a small cost."""
        return len(self.leases) < self.capacity


def _info(member: object) -> Awaitable[object]:
    return member.info()  # type: ignore[attr-defined]


class Pool(Generic[T]):
    def __init__(
        self, members: list[T], kind: str = "replica", probe: Callable[[T], Awaitable[object]] = _info
    ) -> None:
        self.kind = kind
        #: The health check of a member that is down (default: its ``info()``).
        self.probe = probe
        self.slots: list[_Slot[T]] = []
        self._tie = itertools.count()
        self._order: list[int] = []
        self._closed = False  # close() ran: no more probes
        for m in members:
            self.add(m)

    # --- membership -------------------------------------------------------------

    def add(self, member: T, capacity: int = 1) -> int:
        self.slots.append(_Slot(member, capacity=max(1, capacity)))
        self._order.append(-1)
        return len(self.slots) - 1

    def drain(self, i: int, on_drained: Callable[[], object] | None = None) -> None:
        """Stop giving ``i`` new requests; call ``on_drained`` once it has none."""
        slot = self.slots[i]
        if slot.draining:
            return
        slot.draining = True
        slot.on_drained = on_drained
        if not slot.leases:
            self._drained(slot)

    def _drained(self, slot: _Slot[T]) -> None:
        callback, slot.on_drained = slot.on_drained, None
        if callback is not None:
            callback()

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if not s.draining and not s.down]

    def is_active(self, i: int) -> bool:
        slot = self.slots[i]
        return not slot.draining and not slot.down

    def name(self, i: int) -> str:
        return getattr(self.slots[i].member, "name", f"{self.kind} {i}")

    def _none_available(self) -> Unavailable:
        down = [self.name(i) for i, s in enumerate(self.slots) if s.down and not s.draining]
        why = f": {', '.join(down)} not reachable (health checks continue)" if down else ""
        return Unavailable(f"no {self.kind} is available{why}")

    # --- health -----------------------------------------------------------------

    def mark_down(self, i: int) -> None:
        """Take ``i`` out of service until a health probe answers."""
        slot = self.slots[i]
        slot.failures += 1
        if slot.down or slot.draining:
            return
        slot.down = True
        log.warning("%s is down; probing it before it gets requests again", self.name(i))
        if self._closed:
            return
        try:
            slot.probe = asyncio.get_running_loop().create_task(self._recover(i))
        except RuntimeError:  # no event loop (a synchronous caller): it stays down
            slot.probe = None

    async def _recover(self, i: int) -> None:
        slot, delay = self.slots[i], PROBE_FIRST
        # Not only cancel(): on Python 3.11 wait_for() drops a cancellation that comes as its probe
        # ends, and the loop went on probing every PROBE_MAX seconds, with close() waiting for it.
        while slot.down and not slot.draining and not self._closed:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.probe(slot.member), PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # still down
                log.debug("%s: health probe failed: %s", self.name(i), exc)
                delay = min(PROBE_MAX, delay * 2)
                continue
            slot.down, slot.failures = False, 0
            log.info("%s answers its health probe again: back in service", self.name(i))
        slot.probe = None

    async def close(self) -> None:
        """Stop the health probes."""
        self._closed = True
        probes = [s.probe for s in self.slots if s.probe is not None]
        for t in probes:
            t.cancel()
        for t in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def __len__(self) -> int:
        return len(self.active())

    def member(self, i: int) -> T:
        return self.slots[i].member

    def in_flight(self, i: int) -> int:
        return len(self.slots[i].leases)

    def set_capacity(self, i: int, capacity: int) -> None:
        """Requests member ``i`` runs in one forward pass (its batch limit)."""
        self.slots[i].capacity = max(1, capacity)

    def headroom(self, i: int) -> float:
        """The free fraction of a batching member's batch, 0..1 (1 = idle; a
        member without batching always 1: its requests queue, they do not share)."""
        slot = self.slots[i]
        return 1.0 if slot.capacity == 1 else max(0.0, 1.0 - len(slot.leases) / slot.capacity)

    # --- leases -----------------------------------------------------------------

    def latency(self, i: int) -> float:
        """Smoothed seconds per completed request on ``i`` (0 = not measured yet)."""
        return self.slots[i].latency

    def _least_loaded(self, candidates: list[int], affinity: Callable[[int], int] | None = None) -> int:
        """Least loaded first; then the fastest (replicas within 20% of the
        fastest count as equally fast, unmeasured ones as fast); then the one
        that already caches the most of the request (``affinity``); then the
        one used longest ago, spreading load evenly."""
        load = min(len(self.slots[i].leases) for i in candidates)
        candidates = [i for i in candidates if len(self.slots[i].leases) == load]
        now = clock()
        candidates = [i for i in candidates if self.slots[i].busy_until <= now] or candidates
        fastest = min(self.slots[i].latency for i in candidates)
        candidates = [i for i in candidates if self.slots[i].latency <= fastest * SAME_SPEED]
        return min(candidates, key=lambda i: (-(affinity(i) if affinity else 0), self._order[i]))

    def _free_from(self, i: int, now: float) -> float:
        """When (clock) replica ``i`` can start a new pass: ``now``, or once a cancelled pass it still runs ends."""
        return max(now, self.slots[i].busy_until)

    def _take(self, i: int, depth: Callable[[], int], preempt: Callable[[], None] | None) -> Lease:
        now = clock()
        lease = Lease(i, depth, preempt, started=now, runs_from=self._free_from(i, now))
        self.slots[i].leases.add(lease)
        self.slots[i].served += 1
        self._order[i] = next(self._tie)
        return lease

    def idle(self) -> list[int]:
        return [i for i in self.active() if not self.slots[i].leases]

    def least_loaded(self) -> int:
        active = self.active()
        if not active:
            raise self._none_available()
        return self._least_loaded(active)

    def acquire_idle(
        self,
        depth: Callable[[], int],
        preempt: Callable[[], None] | None = None,
        affinity: Callable[[int], int] | None = None,
    ) -> Lease | None:
        """A lease for a speculative verification on a replica with spare
        capacity (an idle one, without batching), or None when there is none."""
        spare = [i for i in self.active() if self.slots[i].spare]
        return self._take(self._least_loaded(spare, affinity), depth, preempt) if spare else None

    def acquire_frontier(self, affinity: Callable[[int], int] | None = None) -> tuple[Lease, bool]:
        """A replica for a frontier step; returns (lease, preempted_someone)."""
        idle = self.idle()
        if idle:
            return self._take(self._least_loaded(idle, affinity), _frontier, None), False
        room = [i for i in self.active() if self.slots[i].has_room]  # batching: join a pass, preempt nobody
        if room:
            return self._take(self._least_loaded(room, affinity), _frontier, None), False
        victims = [
            lease
            for i in self.active()
            for lease in self.slots[i].leases
            if lease.preempt is not None and lease.depth() > 0
        ]
        if victims:
            victim = max(victims, key=lambda lease: lease.depth())
            self.release(victim)
            assert victim.preempt is not None
            victim.preempt()
            return self._take(victim.replica, _frontier, None), True
        return self._take(self.least_loaded(), _frontier, None), False

    def acquire_on(self, i: int) -> Lease:
        """A lease on replica ``i``, busy or not (sequential strategies keep
        one replica, and its cache, for a whole generation)."""
        return self._take(i, _frontier, None)

    def busy_since(self, i: int, started: float, tokens: int = 0) -> None:
        """Replica ``i`` runs a pass since ``started`` (clock) that nobody
        waits for (cancelled): choose it last until that pass would end, after
        its latency or, if longer, what a pass of ``tokens`` takes there (a
        chunk of many drafts on a target that computes each)."""
        slot = self.slots[i]
        seconds = max(slot.latency, self.pass_seconds(i, tokens))
        if seconds:
            slot.busy_until = max(slot.busy_until, started + seconds)

    def pass_seconds(self, i: int, tokens: int) -> float:
        """Seconds a pass computing ``tokens`` is expected to take on ``i``:
        what its reported passes of that size took where it reported any,
        else its latency (0: not measured yet)."""
        slot = self.slots[i]
        if tokens > 0 and slot.pass_cost.measured:
            base, per_token = slot.pass_cost.fit()
            return base + per_token * tokens
        return slot.latency

    def expected_end(self, lease: Lease) -> float:
        """When (clock) ``lease``'s request is expected to answer: once its
        pass starts (after any cancelled pass its replica still runs), what a
        pass of its tokens takes there."""
        return lease.runs_from + self.pass_seconds(lease.replica, lease.tokens)

    def soonest_idle(self, tokens: Callable[[int], int]) -> tuple[int, float] | None:
        """The idle replica expected to answer a request of ``tokens(i)``
        tokens soonest, and when (clock): after what a cancelled pass still
        holds it for, its pass's time there. None when none is idle (or none
        is measured yet)."""
        now = clock()
        best: tuple[int, float] | None = None
        for i in self.idle():
            seconds = self.pass_seconds(i, tokens(i))
            end = self._free_from(i, now) + seconds
            if seconds and (best is None or end < best[1]):
                best = (i, end)
        return best

    def measured_pass(self, i: int, tokens: int, seconds: float) -> None:
        """Replica ``i`` reports that a pass computing ``tokens`` took ``seconds`` of its own time."""
        if tokens > 0 and seconds > 0:
            self.slots[i].pass_cost.add(tokens, seconds)

    def release(
        self,
        lease: Lease,
        completed: bool = False,
        unreachable: bool = False,
        cancelled: bool = False,
        passes: float = 1.0,
    ) -> None:
        """End a lease; ``completed`` requests update the replica's latency
        (per pass: a request that was ``passes`` passes' worth of work, a
        long prefill, counts its seconds over that many); an ``unreachable``
        replica is down until a health probe answers (:meth:`mark_down`); a
        ``cancelled`` one's pass likely runs on until it would have ended:
        other idle replicas are chosen first till then."""
        if lease.released:
            return
        lease.released = True
        slot = self.slots[lease.replica]
        if cancelled:
            self.busy_since(lease.replica, lease.started, lease.tokens)
        if unreachable:
            self.mark_down(lease.replica)
        elif completed:
            slot.failures = 0
        if completed:
            seconds = (clock() - lease.started) / max(passes, 1.0)
            slot.latency = seconds if slot.latency == 0.0 else slot.latency + EWMA * (seconds - slot.latency)
        slot.leases.discard(lease)
        if slot.draining and not slot.leases:
            self._drained(slot)
