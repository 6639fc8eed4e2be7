"""gRPC servicer of dsi.v1.TargetService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc

from dsi.domain.errors import InvalidArgument, Unavailable
from dsi.domain.interfaces import Target
from dsi.serving.gate import Admission, stream_admission
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import code_number, fail, guard, status_logged

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name
#: The methods that do model work: what ``--max-concurrent-requests`` caps (VerifyStream per call it carries).
MODEL_METHODS = (f"/{SERVICE_NAME}/Verify", f"/{SERVICE_NAME}/VerifyStream", f"/{SERVICE_NAME}/Decode")


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, target: Target, verify_stream: bool = True, decode: bool = True) -> None:
        """``verify_stream`` / ``decode``: serve VerifyStream / Decode and say
        so in Info (False: as a target built before them, for tests and
        comparisons)."""
        self.target = target
        self.verify_stream = verify_stream
        self.decode = decode
        self.decodes = 0  # Decode calls received
        self.streams: set[_VerifyStream] = set()
        #: set by :meth:`wind_down`: calls that arrive on a stream now are refused UNAVAILABLE
        self.draining = False
        self.unary_verifications = 0  # Verify calls received
        self.stream_verifications = 0  # verifications received on VerifyStreams

    @guard
    async def Info(self, request: target_pb2.TargetServiceInfoRequest, context: grpc.aio.ServicerContext):
        info = await self.target.info()
        limits = dataclasses.replace(
            info.limits,
            accepts_verify_stream=self.verify_stream or info.limits.accepts_verify_stream,
            accepts_decode=self.decode or info.limits.accepts_decode,
        )
        info = dataclasses.replace(info, limits=limits)
        return target_pb2.TargetServiceInfoResponse(**convert.service_info_parts(info))

    @guard
    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext):
        self.unary_verifications += 1
        result = await self.target.verify(convert.verify_request_from_pb(request))
        return convert.verify_result_to_pb(result)

    async def VerifyStream(
        self, requests: AsyncIterator[target_pb2.VerifyStreamRequest], context: grpc.aio.ServicerContext
    ) -> None:
        if not self.verify_stream:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details("this target does not serve VerifyStream: use Verify")
            return
        stream = _VerifyStream(self, context, stream_admission())
        self.streams.add(stream)
        try:
            await stream.serve(requests)
        finally:
            self.streams.discard(stream)

    @guard
    async def Decode(self, request: target_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> None:
        # Explicit writes, as DrafterServicer.Draft: a client cancel lands here and closes the loop.
        if not self.decode:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details("this target does not serve Decode: use Verify")
            return
        self.decodes += 1
        steps = self.target.decode(convert.decode_request_from_pb(request))
        try:
            async for result in steps:
                await context.write(convert.decoded_to_pb(result))
        finally:
            await steps.aclose()  # type: ignore[attr-defined]

    @guard
    async def ReleaseSession(
        self, request: target_pb2.TargetServiceReleaseSessionRequest, context: grpc.aio.ServicerContext
    ):
        released = await self.target.release_session(request.session_id)
        return target_pb2.TargetServiceReleaseSessionResponse(released=released)

    async def wind_down(self, grace: float) -> None:
        """Shutting down (:meth:`dsi.serving.server.RunningServer.stop`): refuse
        new calls on open streams, give the calls in flight ``grace`` seconds,
        then end every stream UNAVAILABLE (its client opens a new one, which a
        stopped server refuses, and fails over)."""
        self.draining = True
        running = [t for s in self.streams for t in s.running]
        if running:
            await asyncio.wait(running, timeout=grace)
        for stream in list(self.streams):
            stream.end("this target is shutting down")


class _VerifyStream:
    """One VerifyStream call: each verification it carries runs as its own task
    (concurrently, as separate Verify calls do); one writer at a time."""

    def __init__(self, servicer: TargetServicer, context: grpc.aio.ServicerContext, admission: Admission) -> None:
        self.servicer = servicer
        self.context = context
        self.admission = admission
        self.tasks: dict[int, asyncio.Task[None]] = {}  # calls still cancellable, by call id
        self.running: set[asyncio.Task[None]] = set()  # every call's task until its answer is written
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._ended: str | None = None  # why the server ended the stream (end())

    async def serve(self, requests: AsyncIterator[target_pb2.VerifyStreamRequest]) -> None:
        self._reader = asyncio.ensure_future(self._read(requests))
        try:
            await self._reader  # until the client half-closes
            while self.running:  # then answer what is in flight (a call leaves self.tasks before it writes)
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

    async def _read(self, requests: AsyncIterator[target_pb2.VerifyStreamRequest]) -> None:
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "verify":
                await self._start(msg.call_id, msg.verify)
            elif kind == "cancel":
                task = self.tasks.get(msg.call_id)
                if task is not None:
                    task.cancel()
            else:
                await self._answer_error(msg.call_id, InvalidArgument("a VerifyStreamRequest needs verify or cancel"))

    async def _start(self, call_id: int, request: target_pb2.VerifyRequest) -> None:
        self.servicer.stream_verifications += 1
        if call_id in self.tasks:
            error = InvalidArgument(f"call_id {call_id} is already in flight on this stream")
        elif self.servicer.draining:
            error = Unavailable("this target is shutting down")
        else:
            error = self.admission.admit()
        if error is not None:
            await self._answer_error(call_id, error)
        else:
            task = self.tasks[call_id] = asyncio.ensure_future(self._call(call_id, request))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _call(self, call_id: int, request: target_pb2.VerifyRequest) -> None:
        try:
            try:
                result = await self._verify(request)
                response = target_pb2.VerifyStreamResponse(call_id=call_id, result=result)
            except asyncio.CancelledError:
                return  # cancelled by the client (or the stream ended): nothing to answer
            except Exception as exc:
                response = target_pb2.VerifyStreamResponse(call_id=call_id, error=_error(exc))
            finally:
                # Not cancellable from here on: a cancel that comes now finds no task.
                self.admission.release()
                if self.tasks.get(call_id) is asyncio.current_task():
                    del self.tasks[call_id]
            await self._write(response)
        except asyncio.CancelledError:
            pass  # the stream ended while the answer was being written

    async def _verify(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        result = await self.servicer.target.verify(convert.verify_request_from_pb(request))
        return convert.verify_result_to_pb(result)

    async def _answer_error(self, call_id: int, exc: Exception) -> None:
        await self._write(target_pb2.VerifyStreamResponse(call_id=call_id, error=_error(exc)))

    async def _write(self, response: target_pb2.VerifyStreamResponse) -> None:
        async with self._write_lock:
            try:
                await self.context.write(response)
            except (grpc.aio.AbortError, grpc.aio.UsageError, RuntimeError, asyncio.InvalidStateError):
                pass  # the stream has ended: nobody is waiting for the answer


def _error(exc: BaseException) -> target_pb2.VerifyStreamError:
    code, message = status_logged(exc, "TargetServicer.VerifyStream")
    return target_pb2.VerifyStreamError(code=code_number(code), message=message)


def register(target: Target, verify_stream: bool = True, decode: bool = True):
    """A ``register`` callback for :func:`dsi.serving.server.start_server`."""
    return register_servicer(TargetServicer(target, verify_stream, decode))


def register_servicer(servicer: TargetServicer):
    """A ``register`` callback serving ``servicer``."""

    def _register(server: grpc.aio.Server) -> list[str]:
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    _register.servicer = servicer  # type: ignore[attr-defined]
    return _register
