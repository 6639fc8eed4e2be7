"""The server side of a stream of calls: many calls of one kind multiplexed by
call id on one long-lived bidirectional stream (a target's VerifyStream, a
drafter's DraftStream), so that a call costs a message each way instead of a
call's set-up.

:class:`CallStream` is one such stream: each call it carries runs as its own
task, concurrently (as separate calls do), and is counted against the server's
concurrency cap (:func:`dsi.serving.gate.stream_admission`); a cancel message
cancels its task; its messages go out one write at a time. A subclass says
what a call does (:meth:`CallStream.run`) and how its failure reads
(:meth:`CallStream.failed`). :class:`OpenStreams` keeps a servicer's open
streams and winds them down when the server stops.

The wire rules (which messages start, cancel, answer and end a call) are in
protos/dsi/v1/target.proto and drafter.proto.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from dsi.domain.errors import InvalidArgument, Unavailable
from dsi.serving.gate import Admission, stream_admission
from dsi.wire.grpc_status import code_number, fail, status_logged


class OpenStreams:
    """The open streams of calls of one servicer, and their wind-down."""

    def __init__(self, what: str) -> None:
        self.what = what  # "this target": how refusals name the server
        self.open: set[CallStream] = set()
        #: set by :meth:`wind_down`: calls that arrive on a stream now are refused UNAVAILABLE
        self.draining = False

    async def serve(self, stream: CallStream, requests: AsyncIterator[Any]) -> None:
        self.open.add(stream)
        try:
            await stream.serve(requests)
        finally:
            self.open.discard(stream)

    async def wind_down(self, grace: float) -> None:
        """Shutting down (:meth:`dsi.serving.server.RunningServer.stop`): refuse
        new calls on open streams, give the calls in flight ``grace`` seconds,
        then end every stream UNAVAILABLE (its client opens a new one, which a
        stopped server refuses, and fails over)."""
        self.draining = True
        running = [t for s in self.open for t in s.running]
        if running:
            await asyncio.wait(running, timeout=grace)
        for stream in list(self.open):
            stream.end(f"{self.what} is shutting down")


class CallStream(abc.ABC):
    """One stream of calls: each call runs as its own task; one writer at a time."""

    #: the request message's ``kind`` that starts a call ("verify", "draft"); "cancel" cancels one
    starts: str
    #: where an unexpected error is logged from
    where: str

    def __init__(self, context: grpc.aio.ServicerContext, streams: OpenStreams) -> None:
        self.context = context
        self.streams = streams
        self.admission: Admission = stream_admission()
        self.tasks: dict[int, asyncio.Task[None]] = {}  # calls still cancellable, by call id
        self.running: set[asyncio.Task[None]] = set()  # every call's task until its last message is written
        self._write_lock = asyncio.Lock()
        self._sending: dict[int, asyncio.Task[None]] = {}  # a call's message being written (send), by call id
        self._reader: asyncio.Task[None] | None = None
        self._ended: str | None = None  # why the server ended the stream (end())

    # --- what a call is -------------------------------------------------------------------

    @abc.abstractmethod
    async def run(self, call_id: int, request: Any) -> Any:
        """Run call ``call_id``; returns its last message (the answer, or its
        end), or None when the last one it sent ended it. Messages before it go
        out with :meth:`send`."""

    @abc.abstractmethod
    def failed(self, call_id: int, code: int, message: str) -> Any:
        """The message that ends call ``call_id`` with a status."""

    @abc.abstractmethod
    def started(self) -> None:
        """A call arrived (for the servicer's counters)."""

    # --- the stream -----------------------------------------------------------------------

    async def serve(self, requests: AsyncIterator[Any]) -> None:
        self._reader = asyncio.ensure_future(self._read(requests))
        try:
            await self._reader  # until the client half-closes
            while self.running:  # then finish what is in flight (a call leaves self.tasks before its last write)
                await asyncio.wait(list(self.running))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._ended is None or (task is not None and task.cancelling()):
                raise  # the call was cancelled (client, deadline, server stop)
            fail(self.context, Unavailable(self._ended))
        finally:
            if self._reader is not None:
                self._reader.cancel()
            for t in list(self.running):  # the stream is gone: so is every call it carried
                t.cancel()

    def end(self, why: str) -> None:
        """End the stream from the server's side: UNAVAILABLE with ``why``."""
        if self._ended is None and self._reader is not None:
            self._ended = why
            self._reader.cancel()

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == self.starts:
                await self._start(msg.call_id, getattr(msg, kind))
            elif kind == "cancel":
                task = self.tasks.get(msg.call_id)
                if task is not None:
                    task.cancel()
            else:
                error = InvalidArgument(f"a {type(msg).__name__} needs {self.starts} or cancel")
                await self.write(self._failure(msg.call_id, error))

    async def _start(self, call_id: int, request: Any) -> None:
        self.started()
        if call_id in self.tasks:
            error = InvalidArgument(f"call_id {call_id} is already in flight on this stream")
        elif self.streams.draining:
            error = Unavailable(f"{self.streams.what} is shutting down")
        else:
            error = self.admission.admit()
        if error is not None:
            await self.write(self._failure(call_id, error))
        else:
            task = self.tasks[call_id] = asyncio.ensure_future(self._call(call_id, request))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _call(self, call_id: int, request: Any) -> None:
        try:
            try:
                last = await self.run(call_id, request)
            except asyncio.CancelledError:
                return  # cancelled by the client (or the stream ended): nothing more to send
            except Exception as exc:
                last = self._failure(call_id, exc)
            finally:
                # Not cancellable from here on: a cancel that comes now finds no task.
                self.admission.release()
                if self.tasks.get(call_id) is asyncio.current_task():
                    del self.tasks[call_id]
            if last is not None:
                await self._sent(call_id)
                await self.write(last)
        except asyncio.CancelledError:
            pass  # the stream ended while the last message was being written
        finally:
            self._sending.pop(call_id, None)  # a write still in flight finishes on its own (self.running)

    def _failure(self, call_id: int, exc: BaseException) -> Any:
        code, message = status_logged(exc, self.where)
        return self.failed(call_id, code_number(code), message)

    async def write(self, message: Any) -> None:
        async with self._write_lock:
            try:
                await self.context.write(message)
            except (grpc.aio.AbortError, grpc.aio.UsageError, RuntimeError, asyncio.InvalidStateError):
                pass  # the stream has ended: nobody is waiting for the message

    async def send(self, message: Any) -> None:
        """A message in the middle of a call (``message.call_id``'s), written
        behind the call's work: this returns once the call's previous message
        is written and this one's write has begun, so the call goes on (drafts
        its next chunk) while it is written (dsi.serving.write_behind). The
        write is a task of its own, written whole even when the call is
        cancelled meanwhile (a write cancelled half way would break the
        stream; the client drops what comes for a call it cancelled)."""
        await self._sent(message.call_id)
        task = self._sending[message.call_id] = asyncio.ensure_future(self.write(message))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _sent(self, call_id: int) -> None:
        """Wait until call ``call_id``'s message in flight (:meth:`send`) is written."""
        task = self._sending.pop(call_id, None)
        if task is not None:
            await asyncio.shield(task)
