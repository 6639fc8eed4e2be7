"""gRPC servicer of dsi.v1.TargetService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import grpc

from dsi.domain.interfaces import Target
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import guard

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, target: Target) -> None:
        self.target = target

    @guard
    async def Info(self, request: target_pb2.TargetServiceInfoRequest, context: grpc.aio.ServicerContext):
        return target_pb2.TargetServiceInfoResponse(**convert.service_info_parts(await self.target.info()))

    @guard
    async def Verify(self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext):
        result = await self.target.verify(convert.verify_request_from_pb(request))
        return convert.verify_result_to_pb(result)

    @guard
    async def ReleaseSession(
        self, request: target_pb2.TargetServiceReleaseSessionRequest, context: grpc.aio.ServicerContext
    ):
        released = await self.target.release_session(request.session_id)
        return target_pb2.TargetServiceReleaseSessionResponse(released=released)


def register(target: Target):
    """A ``register`` callback for :func:`dsi.serving.server.start_server`."""

    def _register(server: grpc.aio.Server) -> list[str]:
        target_pb2_grpc.add_TargetServiceServicer_to_server(TargetServicer(target), server)
        return [SERVICE_NAME]

    return _register
