"""The client side of TargetService.VerifyStream: many Verify calls on one
long-lived stream, one message each way per verification.

:class:`VerifyStream` opens its stream lazily on the first call, multiplexes
calls on it by call id (one writer task sends, one reader task dispatches the
answers to the callers' futures), and, when the stream breaks (the target
died, restarted or shut down), fails every call in flight with the domain
error a Verify call would have raised (``Unavailable``) and opens a new stream
for the next call. Cancelling the task that awaits :meth:`VerifyStream.verify`
sends a cancel message for its call, which cancels it on the target as
cancelling a Verify call does.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc

from dsi.domain.errors import DsiError, Unavailable
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire.grpc_status import code_of_number, from_status, to_domain

#: Statuses of the stream call itself that say something about the request or the caller (not the
#: peer's health): passed on as they are. Any other status ends the stream as ``Unavailable``, so
#: the engine fails the calls over to another replica (e.g. INTERNAL "Internal error from Core" when
#: the target's process goes away mid-stream; each call's own errors travel as messages).
_CALLER_STATUSES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def _stream_error(exc: grpc.aio.AioRpcError, peer: str) -> DsiError:
    if exc.code() in _CALLER_STATUSES:
        return to_domain(exc, peer)
    return Unavailable(f"{peer} is unavailable: the verify stream failed ({exc.code().name}: {exc.details()})")


#: How long :meth:`VerifyStream.close` waits for the target to answer the calls in flight and end the stream.
CLOSE_TIMEOUT_S = 5.0
_CLOSE = object()


class _Stream:
    """One open VerifyStream call and the calls in flight on it."""

    def __init__(self, stub: target_pb2_grpc.TargetServiceStub, peer: str) -> None:
        self.peer = peer
        self.call: Any = stub.VerifyStream()
        self.pending: dict[int, asyncio.Future[target_pb2.VerifyResponse]] = {}
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.broken: DsiError | None = None
        self.writer = asyncio.ensure_future(self._write())
        self.reader = asyncio.ensure_future(self._read())

    def send(self, message: target_pb2.VerifyStreamRequest) -> None:
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
            self.fail(_stream_error(exc, self.peer))
        except Exception as exc:  # the call ended (InvalidStateError...): the reader learns how
            self.fail(Unavailable(f"{self.peer} is unavailable: the verify stream ended ({type(exc).__name__})"))

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self.fail(Unavailable(f"{self.peer} is unavailable: the verify stream ended"))
                    return
                future = self.pending.pop(message.call_id, None)
                if future is None or future.done():
                    continue  # cancelled meanwhile
                if message.WhichOneof("outcome") == "result":
                    future.set_result(message.result)
                else:
                    future.set_exception(
                        from_status(code_of_number(message.error.code), message.error.message, self.peer)
                    )
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self.fail(_stream_error(exc, self.peer))
        except Exception as exc:
            self.fail(Unavailable(f"{self.peer} is unavailable: the verify stream failed ({exc!r})"))

    def fail(self, error: DsiError) -> None:
        """The stream is broken: every call in flight fails with ``error``."""
        if self.broken is None:
            self.broken = error
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        self.writer.cancel()

    async def close(self, timeout: float) -> None:
        """Half-close, give the target ``timeout`` seconds to answer and end, then cancel."""
        if self.broken is None:
            self.send(_CLOSE)
            try:
                await asyncio.wait_for(asyncio.shield(self.reader), timeout)
            except asyncio.TimeoutError:
                pass  # cancelled below
        self.broken = self.broken or Unavailable(f"{self.peer} is unavailable: the verify stream was closed")
        self.call.cancel()
        for task in (self.writer, self.reader):
            task.cancel()
        await asyncio.gather(self.writer, self.reader, return_exceptions=True)
        self.fail(self.broken)


class VerifyStream:
    """Verify calls to one target over one VerifyStream at a time."""

    def __init__(self, stub: target_pb2_grpc.TargetServiceStub, peer: str, timeout: float | None = None) -> None:
        self.stub = stub
        self.peer = peer
        self.timeout = timeout
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        self.calls = 0  # verifications sent on a stream
        self.opened = 0  # streams opened

    def _open(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = self._stream = _Stream(self.stub, self.peer)
            self.opened += 1
        return stream

    async def verify(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        stream = self._open()
        call_id = next(self._ids)
        future: asyncio.Future[target_pb2.VerifyResponse] = asyncio.get_running_loop().create_future()
        stream.pending[call_id] = future
        stream.send(target_pb2.VerifyStreamRequest(call_id=call_id, verify=request))
        self.calls += 1
        try:
            if self.timeout is None:
                return await future
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            self._cancel(stream, call_id)
            raise Unavailable(f"{self.peer} is unavailable: Deadline Exceeded") from None
        except asyncio.CancelledError:
            self._cancel(stream, call_id)
            raise

    @staticmethod
    def _cancel(stream: _Stream, call_id: int) -> None:
        if stream.pending.pop(call_id, None) is not None and stream.broken is None:
            stream.send(target_pb2.VerifyStreamRequest(call_id=call_id, cancel=target_pb2.VerifyStreamCancel()))

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """End the stream cleanly (calls in flight are answered first, for at most ``timeout`` seconds)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close(timeout)
