"""gRPC servicer of dsi.v1.DrafterService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import grpc

from dsi.domain.interfaces import Drafter
from dsi.v1 import drafter_pb2, drafter_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import guard

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter

    @guard
    async def Info(self, request: drafter_pb2.DrafterServiceInfoRequest, context: grpc.aio.ServicerContext):
        return drafter_pb2.DrafterServiceInfoResponse(**convert.service_info_parts(await self.drafter.info()))

    @guard
    async def Draft(self, request: drafter_pb2.DraftRequest, context: grpc.aio.ServicerContext) -> None:
        # Explicit writes (not an async-generator handler): a client cancel
        # lands inside this coroutine, so the drafting stream is closed here,
        # within one token step, and its session is left idle.
        stream = self.drafter.draft(convert.draft_request_from_pb(request))
        try:
            async for chunk in stream:
                await context.write(convert.draft_chunk_to_pb(chunk))
        finally:
            await stream.aclose()

    @guard
    async def ReleaseSession(
        self, request: drafter_pb2.DrafterServiceReleaseSessionRequest, context: grpc.aio.ServicerContext
    ):
        released = await self.drafter.release_session(request.session_id)
        return drafter_pb2.DrafterServiceReleaseSessionResponse(released=released)


def register(drafter: Drafter):
    def _register(server: grpc.aio.Server) -> list[str]:
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(DrafterServicer(drafter), server)
        return [SERVICE_NAME]

    return _register
