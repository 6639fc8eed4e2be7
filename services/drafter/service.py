"""gRPC servicer of dsi.v1.DrafterService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc

from dsi.domain.interfaces import Drafter
from dsi.serving.call_stream import CallStream, OpenStreams
from dsi.serving.write_behind import write_all
from dsi.v1 import drafter_pb2, drafter_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import guard

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name
#: The methods that do model work: what ``--max-concurrent-requests`` caps (DraftStream per call it carries).
MODEL_METHODS = (f"/{SERVICE_NAME}/Draft", f"/{SERVICE_NAME}/DraftStream")


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, drafter: Drafter, draft_stream: bool = True) -> None:
        """``draft_stream``: serve DraftStream and say so in Info (False: as a
        drafter built before it, for tests and comparisons)."""
        self.drafter = drafter
        self.draft_stream = draft_stream
        self.streams = OpenStreams("this drafter")
        self.unary_drafts = 0  # Draft calls received
        self.stream_drafts = 0  # draft calls received on DraftStreams

    @guard
    async def Info(self, request: drafter_pb2.DrafterServiceInfoRequest, context: grpc.aio.ServicerContext):
        info = await self.drafter.info()
        limits = dataclasses.replace(
            info.limits, accepts_draft_stream=self.draft_stream or info.limits.accepts_draft_stream
        )
        info = dataclasses.replace(info, limits=limits)
        return drafter_pb2.DrafterServiceInfoResponse(**convert.service_info_parts(info))

    @guard
    async def Draft(self, request: drafter_pb2.DraftRequest, context: grpc.aio.ServicerContext) -> None:
        # Explicit writes (not an async-generator handler): a client cancel
        # lands inside this coroutine, so the drafting stream is closed here,
        # within one token step, and its session is left idle.
        self.unary_drafts += 1
        stream = self.drafter.draft(convert.draft_request_from_pb(request))
        await write_all(context.write, stream, convert.draft_chunk_to_pb)  # the next chunk is drafted meanwhile

    async def DraftStream(
        self, requests: AsyncIterator[drafter_pb2.DraftStreamRequest], context: grpc.aio.ServicerContext
    ) -> None:
        if not self.draft_stream:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details("this drafter does not serve DraftStream: use Draft")
            return
        await self.streams.serve(_DraftStream(self, context), requests)

    @guard
    async def ReleaseSession(
        self, request: drafter_pb2.DrafterServiceReleaseSessionRequest, context: grpc.aio.ServicerContext
    ):
        released = await self.drafter.release_session(request.session_id)
        return drafter_pb2.DrafterServiceReleaseSessionResponse(released=released)

    async def wind_down(self, grace: float) -> None:
        """Shutting down: :meth:`OpenStreams.wind_down` of its DraftStreams."""
        await self.streams.wind_down(grace)


class _DraftStream(CallStream):
    """One DraftStream call: each draft stream is a call it carries, its chunks
    sent as they come; a cancel closes its drafting within one token step, as
    a cancelled Draft call does."""

    starts = "draft"
    where = "DrafterServicer.DraftStream"

    def __init__(self, servicer: DrafterServicer, context: grpc.aio.ServicerContext) -> None:
        super().__init__(context, servicer.streams)
        self.servicer = servicer

    def started(self) -> None:
        self.servicer.stream_drafts += 1

    async def run(self, call_id: int, request: drafter_pb2.DraftRequest) -> drafter_pb2.DraftStreamResponse | None:
        stream = self.servicer.drafter.draft(convert.draft_request_from_pb(request))
        ended = False  # by a chunk marked last: the client has what it needs, no end follows
        try:
            async for chunk in stream:
                message = drafter_pb2.DraftStreamResponse(call_id=call_id, chunk=convert.draft_chunk_to_pb(chunk))
                await self.send(message)
                ended = chunk.last
        finally:
            await stream.aclose()
        return None if ended else drafter_pb2.DraftStreamResponse(call_id=call_id, end=drafter_pb2.DraftStreamEnd())

    def failed(self, call_id: int, code: int, message: str) -> drafter_pb2.DraftStreamResponse:
        return drafter_pb2.DraftStreamResponse(
            call_id=call_id, error=drafter_pb2.DraftStreamError(code=code, message=message)
        )


def register(drafter: Drafter, draft_stream: bool = True):
    """A ``register`` callback for :func:`dsi.serving.server.start_server`."""
    return register_servicer(DrafterServicer(drafter, draft_stream))


def register_servicer(servicer: DrafterServicer):
    """A ``register`` callback serving ``servicer``."""

    def _register(server: grpc.aio.Server) -> list[str]:
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    _register.servicer = servicer  # type: ignore[attr-defined]
    return _register
