"""gRPC servicer of dsi.v1.TargetService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc

from dsi.domain.interfaces import Target
from dsi.serving.call_stream import CallStream, OpenStreams
from dsi.serving.write_behind import write_all
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import guard

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
        self.streams = OpenStreams("this target")
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
        await self.streams.serve(_VerifyStream(self, context), requests)

    @guard
    async def Decode(self, request: target_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> None:
        # Explicit writes, as DrafterServicer.Draft: a client cancel lands here and closes the loop.
        if not self.decode:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details("this target does not serve Decode: use Verify")
            return
        self.decodes += 1
        steps = self.target.decode(convert.decode_request_from_pb(request))
        await write_all(context.write, steps, convert.decoded_to_pb)  # the next step runs while a token is written

    @guard
    async def ReleaseSession(
        self, request: target_pb2.TargetServiceReleaseSessionRequest, context: grpc.aio.ServicerContext
    ):
        released = await self.target.release_session(request.session_id)
        return target_pb2.TargetServiceReleaseSessionResponse(released=released)

    async def wind_down(self, grace: float) -> None:
        """Shutting down: :meth:`OpenStreams.wind_down` of its VerifyStreams."""
        await self.streams.wind_down(grace)


class _VerifyStream(CallStream):
    """One VerifyStream call: each verification is a call it carries."""

    starts = "verify"
    where = "TargetServicer.VerifyStream"

    def __init__(self, servicer: TargetServicer, context: grpc.aio.ServicerContext) -> None:
        super().__init__(context, servicer.streams)
        self.servicer = servicer

    def started(self) -> None:
        self.servicer.stream_verifications += 1

    async def run(self, call_id: int, request: target_pb2.VerifyRequest) -> target_pb2.VerifyStreamResponse:
        result = await self.servicer.target.verify(convert.verify_request_from_pb(request))
        return target_pb2.VerifyStreamResponse(call_id=call_id, result=convert.verify_result_to_pb(result))

    def failed(self, call_id: int, code: int, message: str) -> target_pb2.VerifyStreamResponse:
        return target_pb2.VerifyStreamResponse(
            call_id=call_id, error=target_pb2.VerifyStreamError(code=code, message=message)
        )


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
