"""Bounded per-session state with in-order access.

A service keeps one state object (a KV cache, say) per session id. The store
bounds their number and their idle time: when it is full, the least recently
used idle session is evicted; when every session is busy, a new one is refused
with RESOURCE_EXHAUSTED. Requests of one session run one at a time, in
arrival order.

A release can overtake the request that would create the session: a client
that cancels a call on a stream and then releases the session with a unary
call has no say in which the server reads first. A release of a session the
store does not hold is therefore remembered for a while (``released_ahead_s``),
and a request that would create that session in that time is refused with
CANCELLED instead of building a state nobody will release.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from dsi.domain.errors import Cancelled, ResourceExhausted

S = TypeVar("S")


@dataclass
class _Entry(Generic[S]):
    state: S
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    last_used: float = 0.0
    released: bool = False


class SessionStore(Generic[S]):
    def __init__(
        self,
        factory: Callable[[], S],
        max_sessions: int = 256,
        idle_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[S], None] | None = None,
        released_ahead_s: float = 30.0,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self._factory = factory
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._on_drop = on_drop
        self._entries: OrderedDict[str, _Entry[S]] = OrderedDict()  # least recently used first
        self.evicted = 0
        self.released_ahead_s = released_ahead_s
        #: Released before they existed: session id -> when (oldest first; at most ``4 * max_sessions``).
        self._released_ahead: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    @property
    def busy(self) -> int:
        return sum(1 for e in self._entries.values() if e.users)

    def is_busy(self, session_id: str) -> bool:
        e = self._entries.get(session_id)
        return bool(e and e.users)

    def _drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id)
        if self._on_drop is not None:
            self._on_drop(entry.state)

    def evict_idle(self) -> int:
        """Drop sessions idle for longer than the idle timeout."""
        now = self._clock()
        stale = [sid for sid, e in self._entries.items() if not e.users and now - e.last_used > self.idle_timeout]
        for sid in stale:
            self._drop(sid)
        self.evicted += len(stale)
        return len(stale)

    def _make_room(self) -> None:
        self.evict_idle()
        if len(self._entries) < self.max_sessions:
            return
        for sid, e in self._entries.items():  # least recently used first
            if not e.users:
                self._drop(sid)
                self.evicted += 1
                return
        raise ResourceExhausted(f"all {self.max_sessions} sessions are busy; retry later or raise --max-sessions")

    @asynccontextmanager
    async def use(self, session_id: str, missing: Callable[[], Exception] | None = None) -> AsyncIterator[S]:
        """Hold the session's state, waiting for earlier requests of the same
        session. Cancellation while waiting leaves nothing behind. A session
        that does not exist is created, unless ``missing`` is given (a
        request that needs what the session holds): then its error is raised,
        and nothing is created or evicted."""
        entry = self._entries.get(session_id)
        if entry is None or entry.released:
            if missing is not None:
                raise missing()
            if self._was_released_ahead(session_id):
                raise Cancelled(f"session {session_id!r} was released before this request arrived")
            self._make_room()
            entry = _Entry(self._factory())
            self._entries[session_id] = entry
        self._entries.move_to_end(session_id)
        entry.users += 1
        try:
            async with entry.lock:
                yield entry.state
        finally:
            entry.users -= 1
            entry.last_used = self._clock()
            if entry.released and not entry.users:
                if self._entries.get(session_id) is entry:
                    self._drop(session_id)
                elif self._on_drop is not None:  # replaced by a new session of the same id
                    self._on_drop(entry.state)

    async def sweep_forever(self, interval: float | None = None) -> None:
        """Evict idle sessions periodically, so that a quiet server frees
        them too (default interval: a quarter of the idle timeout, <= 30 s)."""
        period = interval or min(max(self.idle_timeout / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(period)
            self.evict_idle()

    def release(self, session_id: str) -> bool:
        """Drop a session now, or as soon as its running requests finish."""
        entry = self._entries.get(session_id)
        if entry is None:
            self._remember_released_ahead(session_id)
            return False
        if entry.released:
            return False
        entry.released = True
        if not entry.users:
            self._drop(session_id)
        return True

    def _remember_released_ahead(self, session_id: str) -> None:
        now = self._clock()
        ahead = self._released_ahead
        ahead[session_id] = now
        ahead.move_to_end(session_id)
        while len(ahead) > 4 * self.max_sessions or now - next(iter(ahead.values())) > self.released_ahead_s:
            ahead.popitem(last=False)

    def _was_released_ahead(self, session_id: str) -> bool:
        when = self._released_ahead.get(session_id)
        if when is None:
            return False
        if self._clock() - when > self.released_ahead_s:
            del self._released_ahead[session_id]
            return False
        return True
