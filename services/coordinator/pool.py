"""Replica pools shared by every generation of a coordinator.

A pool tracks the requests each instance is serving. Speculative
verifications go only to idle target replicas (so they never queue behind
other work); a frontier step (the one that guarantees progress) goes to an
idle replica, else preempts the speculative verification that is furthest
ahead of its own frontier, else queues on the least loaded replica.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


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
    released: bool = False


@dataclass
class _Slot(Generic[T]):
    member: T
    leases: set[Lease] = field(default_factory=set)
    served: int = 0


class Pool(Generic[T]):
    def __init__(self, members: list[T]) -> None:
        if not members:
            raise ValueError("a pool needs at least one member")
        self.slots = [_Slot(m) for m in members]
        self._tie = itertools.count()
        self._order: list[int] = [0] * len(members)

    def __len__(self) -> int:
        return len(self.slots)

    def member(self, i: int) -> T:
        return self.slots[i].member

    def in_flight(self, i: int) -> int:
        return len(self.slots[i].leases)

    def _least_loaded(self, candidates: list[int]) -> int:
        # Ties go to the replica used longest ago, spreading load evenly.
        return min(candidates, key=lambda i: (len(self.slots[i].leases), self._order[i]))

    def _take(self, i: int, depth: Callable[[], int], preempt: Callable[[], None] | None) -> Lease:
        lease = Lease(i, depth, preempt)
        self.slots[i].leases.add(lease)
        self.slots[i].served += 1
        self._order[i] = next(self._tie)
        return lease

    def idle(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if not s.leases]

    def acquire_idle(self, depth: Callable[[], int], preempt: Callable[[], None] | None = None) -> Lease | None:
        """A lease on an idle replica, or None when every replica is busy."""
        idle = self.idle()
        return self._take(self._least_loaded(idle), depth, preempt) if idle else None

    def acquire_frontier(self) -> tuple[Lease, bool]:
        """A replica for a frontier step; returns (lease, preempted_someone)."""
        idle = self.idle()
        if idle:
            return self._take(self._least_loaded(idle), _frontier, None), False
        victims = [lease for s in self.slots for lease in s.leases if lease.preempt and lease.depth() > 0]
        if victims:
            victim = max(victims, key=lambda lease: lease.depth())
            self.release(victim)
            assert victim.preempt is not None
            victim.preempt()
            return self._take(victim.replica, _frontier, None), True
        return self._take(self.least_loaded(), _frontier, None), False

    def least_loaded(self) -> int:
        return self._least_loaded(list(range(len(self.slots))))

    def acquire_on(self, i: int) -> Lease:
        """A lease on replica ``i``, busy or not (sequential strategies keep
        one replica, and its cache, for a whole generation)."""
        return self._take(i, _frontier, None)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            self.slots[lease.replica].leases.discard(lease)
