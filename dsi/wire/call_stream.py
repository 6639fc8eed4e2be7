"""The client side of the streams of calls: TargetService.VerifyStream (many
Verify calls on one long-lived stream, one message each way per verification)
and DrafterService.DraftStream (many Draft calls on one, a message out and
its chunks back per draft stream).

A :class:`VerifyStream` or :class:`DraftStream` opens its stream lazily on the
first call, multiplexes calls on it by call id (one writer task sends, one
reader task passes each message to its call), and, when the stream breaks (the
peer died, restarted or shut down), fails every call in flight with the domain
error the call would have raised (``Unavailable``) and opens a new stream for
the next call. Cancelling a call (the task that awaits
:meth:`VerifyStream.verify`, or closing the iteration of
:meth:`DraftStream.draft` before its end) sends a cancel message for it, which
cancels it on the peer as cancelling the call would.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from dsi.domain.errors import DsiError, Unavailable
from dsi.v1 import drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc
from dsi.wire.grpc_status import code_of_number, from_status, to_domain

#: Statuses of the stream call itself that say something about the request or the caller (not the
#: peer's health): passed on as they are. Any other status ends the stream as ``Unavailable``, so
#: the engine fails the calls over to another replica (e.g. INTERNAL "Internal error from Core" when
#: the peer's process goes away mid-stream; each call's own errors travel as messages).
_CALLER_STATUSES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def _stream_error(exc: grpc.aio.AioRpcError, peer: str, what: str = "verify stream") -> DsiError:
    if exc.code() in _CALLER_STATUSES:
        return to_domain(exc, peer)
    return Unavailable(f"{peer} is unavailable: the {what} failed ({exc.code().name}: {exc.details()})")


#: How long a stream's ``close`` waits for the peer to finish the calls in flight and end the stream.
CLOSE_TIMEOUT_S = 5.0
_CLOSE = object()


class _Call(abc.ABC):
    """What a call in flight on a stream does with the messages that come for it."""

    @abc.abstractmethod
    def deliver(self, message: Any, peer: str) -> bool:
        """Take ``message``; True when it was the call's last."""

    @abc.abstractmethod
    def fail(self, error: DsiError) -> None:
        """The stream broke: the call fails with ``error``."""


class _Stream:
    """One open stream call and the calls in flight on it."""

    def __init__(self, open_call: Callable[[], Any], peer: str, what: str) -> None:
        self.peer = peer
        self.what = what  # "verify stream", "draft stream": how its failures read
        self.call: Any = open_call()
        self.pending: dict[int, _Call] = {}
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.broken: DsiError | None = None
        self.writer = asyncio.ensure_future(self._write())
        self.reader = asyncio.ensure_future(self._read())

    def send(self, message: Any) -> None:
        self.outbox.put_nowait(message)

    async def _write(self) -> None:
        """The one writer (a call takes one write at a time; a cancelled write would cancel the stream)."""
        try:
            while True:
                message = await self.outbox.get()
                if message is _CLOSE:
                    await self.call.done_writing()
                    return
                await self.call.write(message)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self.fail(_stream_error(exc, self.peer, self.what))
        except Exception as exc:  # the call ended (InvalidStateError...): the reader learns how
            self.fail(Unavailable(f"{self.peer} is unavailable: the {self.what} ended ({type(exc).__name__})"))

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self.fail(Unavailable(f"{self.peer} is unavailable: the {self.what} ended"))
                    return
                call = self.pending.get(message.call_id)
                if call is not None and call.deliver(message, self.peer):  # else cancelled meanwhile
                    del self.pending[message.call_id]
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self.fail(_stream_error(exc, self.peer, self.what))
        except Exception as exc:
            self.fail(Unavailable(f"{self.peer} is unavailable: the {self.what} failed ({exc!r})"))

    def fail(self, error: DsiError) -> None:
        """The stream is broken: every call in flight fails with ``error``."""
        if self.broken is None:
            self.broken = error
        pending, self.pending = self.pending, {}
        for call in pending.values():
            call.fail(error)
        self.writer.cancel()

    async def close(self, timeout: float) -> None:
        """Half-close, give the peer ``timeout`` seconds to finish and end, then cancel."""
        if self.broken is None:
            self.send(_CLOSE)
            try:
                await asyncio.wait_for(asyncio.shield(self.reader), timeout)
            except asyncio.TimeoutError:
                pass  # cancelled below
        self.broken = self.broken or Unavailable(f"{self.peer} is unavailable: the {self.what} was closed")
        self.call.cancel()
        for task in (self.writer, self.reader):
            task.cancel()
        await asyncio.gather(self.writer, self.reader, return_exceptions=True)
        self.fail(self.broken)


def _status(error: Any, peer: str) -> DsiError:
    """A call's error message (VerifyStreamError, DraftStreamError) as the domain error."""
    return from_status(code_of_number(error.code), error.message, peer)


class _CallStreams:
    """Calls to one peer over one stream at a time."""

    what = "stream"

    def __init__(self, open_call: Callable[[], Any], peer: str) -> None:
        self.open_call = open_call
        self.peer = peer
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        self.calls = 0  # calls sent on a stream
        self.opened = 0  # streams opened

    def _start(self, call: _Call, request: Callable[[int], Any]) -> tuple[_Stream, int]:
        """Send ``request(call_id)`` as a new call on the open stream (opened now if there is none)."""
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = self._stream = _Stream(self.open_call, self.peer, self.what)
            self.opened += 1
        call_id = next(self._ids)
        stream.pending[call_id] = call
        stream.send(request(call_id))
        self.calls += 1
        return stream, call_id

    def _cancel(self, stream: _Stream, call_id: int, message: Any) -> None:
        """Send ``message``, the cancel of ``call_id``, behind whatever the
        same event-loop turn sends: a cancel frees the peer's work, while the
        call that replaces the stale one (DSI's next verification or draft
        stream after a rejection) is on the critical path, and a write holds
        the event loop 0.05-0.3 ms (docs/benchmarks.md section 13)."""
        if stream.pending.pop(call_id, None) is not None and stream.broken is None:
            asyncio.get_running_loop().call_soon(stream.send, message)

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """End the stream cleanly (calls in flight are finished first, for at most ``timeout`` seconds)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close(timeout)


class _Answer(_Call):
    """A verification: one answer."""

    def __init__(self) -> None:
        self.future: asyncio.Future[target_pb2.VerifyResponse] = asyncio.get_running_loop().create_future()

    def deliver(self, message: target_pb2.VerifyStreamResponse, peer: str) -> bool:
        if not self.future.done():
            if message.WhichOneof("outcome") == "result":
                self.future.set_result(message.result)
            else:
                self.future.set_exception(_status(message.error, peer))
        return True

    def fail(self, error: DsiError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class VerifyStream(_CallStreams):
    """Verify calls to one target over one VerifyStream at a time."""

    what = "verify stream"

    def __init__(self, stub: target_pb2_grpc.TargetServiceStub, peer: str, timeout: float | None = None) -> None:
        super().__init__(stub.VerifyStream, peer)
        self.timeout = timeout

    async def verify(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        answer = _Answer()
        stream, call_id = self._start(answer, lambda i: target_pb2.VerifyStreamRequest(call_id=i, verify=request))
        cancel = target_pb2.VerifyStreamRequest(call_id=call_id, cancel=target_pb2.VerifyStreamCancel())
        try:
            if self.timeout is None:
                return await answer.future
            return await asyncio.wait_for(answer.future, self.timeout)
        except asyncio.TimeoutError:
            self._cancel(stream, call_id, cancel)
            raise Unavailable(f"{self.peer} is unavailable: Deadline Exceeded") from None
        except asyncio.CancelledError:
            self._cancel(stream, call_id, cancel)
            raise


class _Chunks(_Call):
    """A draft stream: chunks, then its end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[drafter_pb2.DraftResponse | DsiError | None] = asyncio.Queue()

    def deliver(self, message: drafter_pb2.DraftStreamResponse, peer: str) -> bool:
        outcome = message.WhichOneof("outcome")
        if outcome == "chunk":
            self.queue.put_nowait(message.chunk)
            if not message.chunk.last:
                return False
            outcome = "end"  # the chunk ended the call: the drafter sends no end
        self.queue.put_nowait(_status(message.error, peer) if outcome == "error" else None)
        return True

    def fail(self, error: DsiError) -> None:
        self.queue.put_nowait(error)


class DraftStream(_CallStreams):
    """Draft calls to one drafter over one DraftStream at a time."""

    what = "draft stream"

    def __init__(self, stub: drafter_pb2_grpc.DrafterServiceStub, peer: str) -> None:
        super().__init__(stub.DraftStream, peer)

    async def draft(self, request: drafter_pb2.DraftRequest) -> AsyncIterator[drafter_pb2.DraftResponse]:
        """The chunks of one draft call; closing the iteration before its end cancels it."""
        chunks = _Chunks()
        stream, call_id = self._start(chunks, lambda i: drafter_pb2.DraftStreamRequest(call_id=i, draft=request))
        ended = False
        try:
            while True:
                item = await chunks.queue.get()
                if item is None or isinstance(item, DsiError):
                    ended = True
                    if item is None:
                        return
                    raise item
                yield item
        finally:
            if not ended:
                cancel = drafter_pb2.DraftStreamRequest(call_id=call_id, cancel=drafter_pb2.DraftStreamCancel())
                self._cancel(stream, call_id, cancel)
