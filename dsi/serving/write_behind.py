"""Server-streamed messages written behind the work that makes them.

``await context.write(message)`` returns only once grpc has taken the message
(its send operation completed through the call's completion queue: a hop to
grpc's poller thread and back to the event loop, 0.3-1 ms on a loaded VM). A
servicer that awaits it before making the next message (the next decode step,
the next drafted chunk, the coordinator's next step after a token went to its
client) puts that hop on the critical path of every message. :class:`WriteBehind`
starts a write and returns at once; the next ``write`` waits for the previous
one first, so at most one write is in flight (grpc's rule for a call) and a
slow reader still holds the writer back by one message, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class WriteBehind:
    """The writes of one server-streaming call (``async with WriteBehind(context.write) as out``).

    Leaving the block normally waits for the last write (its error is
    raised); leaving it by cancellation (the client cancelled, the server
    stops) cancels the write in flight; leaving it by another error waits for
    the last write and drops what the write raises, so the client has every
    message sent before the error's status."""

    def __init__(self, write: Callable[[Any], Awaitable[None]]) -> None:
        self._write = write
        self._last: asyncio.Future[None] | None = None

    async def write(self, message: Any) -> None:
        """Wait for the previous write to end (raising its error), then start this one."""
        await self.flush()
        self._last = asyncio.ensure_future(self._write(message))

    async def flush(self) -> None:
        """Wait for the write in flight, if any (raising its error)."""
        last, self._last = self._last, None
        if last is not None:
            await last

    async def __aenter__(self) -> WriteBehind:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            await self.flush()
            return
        last, self._last = self._last, None
        if last is None:
            return
        if issubclass(kind, asyncio.CancelledError):
            last.cancel()
        await asyncio.wait({last})
        if not last.cancelled():
            last.exception()  # retrieved: the block's own error is what the call ends with


async def write_all(
    write: Callable[[Any], Awaitable[None]], items: AsyncIterator[T], to_message: Callable[[T], Any]
) -> None:
    """Write every item of ``items`` as ``to_message(item)`` behind the work
    that makes the next one; ``items`` is closed at the end (a client cancel
    lands here and closes it within one step)."""
    try:
        async with WriteBehind(write) as out:
            async for item in items:
                await out.write(to_message(item))
    finally:
        await items.aclose()  # type: ignore[attr-defined]
