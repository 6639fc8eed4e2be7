"""An asyncio event loop on a virtual clock, for tests that need controlled
latencies without waiting for them.

Whenever the loop has nothing ready to run and would block until its next
timer, the clock jumps to that timer instead of sleeping. The order of events
is exactly what real sleeps of those lengths would give on an infinitely fast
machine, so thousands of generations with millisecond latencies run in the
time their bookkeeping takes, and the schedule they follow is deterministic.
Work in executor threads (Hugging Face forward passes) takes no virtual time:
while any is running the clock stands still and the loop waits for it in real
time. Real I/O still works.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _SkipAheadSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        assert self.loop is not None
        if timeout is None or self.loop.threads_running:  # wait (really) for a thread or for I/O
            return super().select(None)
        self.loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    #: Sleeps end exactly when due, however short (the synthetic models need not work around a timer).
    exact_timer = True

    def __init__(self) -> None:
        selector = _SkipAheadSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0
        self.threads_running = 0

    def time(self) -> float:
        return self.now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.threads_running += 1

        def done(_: asyncio.Future[T]) -> None:
            self.threads_running -= 1

        future.add_done_callback(done)
        return future


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        _cancel_left_tasks(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _cancel_left_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what ``coro`` left running (a device queue's pass, say) and let
    it unwind, as ``asyncio.run`` does, instead of destroying it pending."""
    left = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
