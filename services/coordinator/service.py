"""gRPC servicer of dsi.v1.GenerationService: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import grpc

from dsi.domain.errors import InvalidArgument
from dsi.serving.write_behind import write_all
from dsi.v1 import generation_pb2, generation_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import guard
from services.coordinator.coordinator import DRAFTER, TARGET, Coordinator, GenerateInput, GenerateOutput, Peer
from services.coordinator.engine import FinishReason, GenerationStats, Strategy
from services.coordinator.pool import Pool

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

STRATEGY_FROM_PB = {
    generation_pb2.STRATEGY_UNSPECIFIED: None,
    generation_pb2.STRATEGY_NONSI: Strategy.NONSI,
    generation_pb2.STRATEGY_SI: Strategy.SI,
    generation_pb2.STRATEGY_DSI: Strategy.DSI,
}
STRATEGY_TO_PB = {v: k for k, v in STRATEGY_FROM_PB.items() if v is not None}
FINISH_TO_PB = {
    None: generation_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
}


def input_from_pb(m: generation_pb2.GenerateRequest, timeout: float | None = None) -> GenerateInput:
    """``timeout``: the seconds the client's deadline leaves (None: no deadline)."""
    if m.strategy not in STRATEGY_FROM_PB:
        raise InvalidArgument(f"unknown strategy {m.strategy}; use STRATEGY_NONSI, STRATEGY_SI or STRATEGY_DSI")
    return GenerateInput(
        prompt=m.prompt,
        prompt_token_ids=m.prompt_token_ids,  # not copied: the coordinator checks its length first
        max_new_tokens=m.max_new_tokens,
        temperature=m.temperature,
        top_p=m.top_p,
        top_k=m.top_k,
        seed=m.seed if m.HasField("seed") else None,
        strategy=STRATEGY_FROM_PB[m.strategy],
        lookahead=m.lookahead,
        auto_lookahead=m.auto_lookahead,
        stop=list(m.stop),
        tree=convert.tree_from_pb(m.tree) if m.HasField("tree") else None,
        timeline=m.timeline,
        timeout=timeout,
    )


def stats_to_pb(s: GenerationStats) -> generation_pb2.GenerationStats:
    return generation_pb2.GenerationStats(
        new_tokens=s.new_tokens,
        wall_seconds=s.wall_seconds,
        time_to_first_token_seconds=s.time_to_first_token_seconds,
        target_forward_passes=s.target_forward_passes,
        drafted_tokens=s.drafted_tokens,
        accepted_tokens=s.accepted_tokens,
        acceptance_rate=s.acceptance_rate,
        verifications_started=s.verifications_started,
        verifications_cancelled=s.verifications_cancelled,
        preemptions=s.preemptions,
        draft_streams=s.draft_streams,
        seed=s.seed,
        alternative_hits=s.alternative_hits,
        failovers=s.failovers,
        drafter_failures=s.drafter_failures,
        tokens_without_drafter=s.tokens_without_drafter,
        drafters=[
            generation_pb2.DrafterStats(
                drafter=d.drafter, decided=d.decided, accepted=d.accepted, unique_accepted=d.unique, dropped=d.dropped
            )
            for d in s.drafters
        ],
    )


def output_to_pb(o: GenerateOutput) -> generation_pb2.GenerateResponse:
    msg = generation_pb2.GenerateResponse(
        token_ids=o.token_ids, text=o.text, finish_reason=FINISH_TO_PB[o.finish_reason]
    )
    if o.stats is not None:
        msg.stats.CopyFrom(stats_to_pb(o.stats))
    if o.timeline is not None:
        msg.timeline.CopyFrom(convert.timeline_to_pb(o.timeline))
    return msg


def _replica(peer: Peer, pool: Pool, i: int) -> generation_pb2.ReplicaInfo:
    return generation_pb2.ReplicaInfo(
        address=peer.address,
        model=convert.model_info_to_pb(peer.info.model),
        in_flight=pool.in_flight(i),
        available=not pool.slots[i].down,
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    @guard
    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        stream = self.coordinator.generate(input_from_pb(request, context.time_remaining()))
        await write_all(context.write, stream, output_to_pb)  # the generation goes on while tokens are written

    @guard
    async def GetInfo(self, request: generation_pb2.GetInfoRequest, context: grpc.aio.ServicerContext):
        c = self.coordinator
        eng = c.engine
        d = c.defaults
        return generation_pb2.GetInfoResponse(
            targets=[_replica(p, eng.targets, i) for i, p in c.peers(TARGET).items()],
            drafters=[_replica(p, eng.drafters, i) for i, p in c.peers(DRAFTER).items()],
            defaults=generation_pb2.GenerationDefaults(
                strategy=STRATEGY_TO_PB[d.strategy],
                lookahead=d.lookahead,
                max_new_tokens=d.max_new_tokens,
                max_sp_degree=eng.sp_degree,
                tree=convert.tree_to_pb(d.tree),
            ),
            has_tokenizer=c.codec.has_tokenizer,
        )


def register(coordinator: Coordinator):
    def _register(server: grpc.aio.Server) -> list[str]:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(coordinator), server)
        return [SERVICE_NAME]

    return _register
