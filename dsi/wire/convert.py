"""Translation between protobuf messages (dsi.v1) and domain types.

Conversions from the wire validate what the domain types require (e.g.
sampling parameters out of range raise InvalidArgument); range checks against a
model's vocabulary and limits happen in the backends. Deprecated fields
(``DraftToken.distribution``, ``DraftRequest.proposal_top_k``) are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsi.domain.timeline import (
    OUTCOMES,
    CommitMark,
    DraftChunkMark,
    DraftStreamSpan,
    Timeline,
    VerificationSpan,
)
from dsi.domain.types import (
    Decision,
    DecodeRequest,
    DraftChunk,
    DraftRequest,
    DraftToken,
    ForwardStats,
    ModelInfo,
    SamplingParams,
    ServiceCounters,
    ServiceInfo,
    ServiceLimits,
    TreeShape,
    VerifyRequest,
    VerifyResult,
)
from dsi.v1 import common_pb2, drafter_pb2, generation_pb2, target_pb2

# --- shared -----------------------------------------------------------------


def sampling_from_pb(msg: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams.create(msg.temperature, msg.top_p, msg.top_k)


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=p.temperature, top_p=0.0 if p.top_p >= 1.0 else p.top_p, top_k=p.top_k)


def draft_tokens_from_pb(msgs: Sequence[common_pb2.DraftToken]) -> list[DraftToken]:
    return [DraftToken(m.token_id, m.parent if m.HasField("parent") else None) for m in msgs]


def draft_tokens_to_pb(tokens: Sequence[DraftToken]) -> list[common_pb2.DraftToken]:
    return [common_pb2.DraftToken(token_id=t.token_id, parent=t.parent) for t in tokens]


def tree_from_pb(m: common_pb2.TreeShape) -> TreeShape:
    return TreeShape.create(m.width, m.depth)


def tree_to_pb(t: TreeShape) -> common_pb2.TreeShape:
    return common_pb2.TreeShape(width=t.width, depth=t.depth)


def stats_to_pb(s: ForwardStats) -> common_pb2.ForwardStats:
    return common_pb2.ForwardStats(
        cached_tokens=s.cached_tokens,
        computed_tokens=s.computed_tokens,
        queue_seconds=s.queue_seconds,
        compute_seconds=s.compute_seconds,
    )


def stats_from_pb(m: common_pb2.ForwardStats) -> ForwardStats:
    return ForwardStats(m.cached_tokens, m.computed_tokens, m.queue_seconds, m.compute_seconds)


def model_info_to_pb(i: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        model_id=i.model_id,
        backend=i.backend,
        vocab_size=i.vocab_size,
        eos_token_ids=list(i.eos_token_ids),
        max_context_tokens=i.max_context_tokens,
        tokenizer_fingerprint=i.tokenizer_fingerprint,
        device=i.device,
        dtype=i.dtype,
        num_parameters=i.num_parameters,
        host=i.host,
    )


def model_info_from_pb(m: common_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_id=m.model_id,
        backend=m.backend,
        vocab_size=m.vocab_size,
        eos_token_ids=tuple(m.eos_token_ids),
        max_context_tokens=m.max_context_tokens,
        tokenizer_fingerprint=m.tokenizer_fingerprint,
        device=m.device,
        dtype=m.dtype,
        num_parameters=m.num_parameters,
        host=m.host,
    )


def service_info_parts(info: ServiceInfo) -> dict:
    """Keyword arguments for Target/DrafterServiceInfoResponse."""
    lim, cnt = info.limits, info.counters
    return dict(
        model=model_info_to_pb(info.model),
        limits=common_pb2.ServiceLimits(
            max_draft_tokens=lim.max_draft_tokens,
            max_lookahead=lim.max_lookahead,
            max_sessions=lim.max_sessions,
            session_idle_timeout_seconds=lim.session_idle_timeout_seconds,
            max_batch=lim.max_batch,
            max_batch_tokens=lim.max_batch_tokens,
            accepts_context_prefix=lim.accepts_context_prefix,
            accepts_verify_stream=lim.accepts_verify_stream,
            accepts_decode=lim.accepts_decode,
            accepts_draft_stream=lim.accepts_draft_stream,
        ),
        counters=common_pb2.ServiceCounters(**vars(cnt)),
    )


def service_info_from_pb(
    m: target_pb2.TargetServiceInfoResponse | drafter_pb2.DrafterServiceInfoResponse,
) -> ServiceInfo:
    lim, cnt = m.limits, m.counters
    return ServiceInfo(
        model=model_info_from_pb(m.model),
        limits=ServiceLimits(
            lim.max_draft_tokens,
            lim.max_lookahead,
            lim.max_sessions,
            lim.session_idle_timeout_seconds,
            lim.max_batch,
            lim.max_batch_tokens,
            lim.accepts_context_prefix,
            lim.accepts_verify_stream,
            lim.accepts_decode,
            lim.accepts_draft_stream,
        ),
        counters=ServiceCounters(**{f: getattr(cnt, f) for f in vars(ServiceCounters())}),
    )


# --- target -----------------------------------------------------------------


def verify_request_from_pb(m: target_pb2.VerifyRequest) -> VerifyRequest:
    return VerifyRequest(
        session_id=m.session_id,
        context=list(m.context_token_ids),
        drafts=draft_tokens_from_pb(m.draft_tokens),
        sampling=sampling_from_pb(m.sampling),
        seed=m.seed,
        prefix_length=m.context_prefix_length,
        prefix_hash=m.context_prefix_hash,
    )


def verify_request_to_pb(r: VerifyRequest) -> target_pb2.VerifyRequest:
    return target_pb2.VerifyRequest(
        session_id=r.session_id,
        context_token_ids=list(r.context),
        draft_tokens=draft_tokens_to_pb(r.drafts),
        sampling=sampling_to_pb(r.sampling),
        seed=r.seed,
        context_prefix_length=r.prefix_length,
        context_prefix_hash=r.prefix_hash,
    )


def decode_request_from_pb(m: target_pb2.DecodeRequest) -> DecodeRequest:
    return DecodeRequest(verify_request_from_pb(m.start), m.max_tokens, frozenset(m.stop_token_ids))


def decode_request_to_pb(r: DecodeRequest) -> target_pb2.DecodeRequest:
    return target_pb2.DecodeRequest(
        start=verify_request_to_pb(r.start), max_tokens=r.max_tokens, stop_token_ids=sorted(r.stop_token_ids)
    )


def decoded_to_pb(r: VerifyResult) -> target_pb2.DecodeResponse:
    return target_pb2.DecodeResponse(token_id=r.next_token, stats=stats_to_pb(r.stats))


def decoded_from_pb(m: target_pb2.DecodeResponse) -> VerifyResult:
    return VerifyResult([], 0, m.token_id, stats_from_pb(m.stats))


def verify_result_to_pb(r: VerifyResult) -> target_pb2.VerifyResponse:
    return target_pb2.VerifyResponse(
        decisions=[target_pb2.DraftDecision(accepted=d.accepted, token_id=d.token_id) for d in r.decisions],
        num_accepted=r.num_accepted,
        next_token_id=r.next_token,
        stats=stats_to_pb(r.stats),
        accepted_path=r.path,
    )


def verify_result_from_pb(m: target_pb2.VerifyResponse) -> VerifyResult:
    return VerifyResult(
        decisions=[Decision(d.accepted, d.token_id) for d in m.decisions],
        num_accepted=m.num_accepted,
        next_token=m.next_token_id,
        stats=stats_from_pb(m.stats),
        # A target that predates trees verifies chains only and sends no path.
        path=list(m.accepted_path) or list(range(m.num_accepted)),
    )


# --- drafter ----------------------------------------------------------------


def draft_request_from_pb(m: drafter_pb2.DraftRequest) -> DraftRequest:
    return DraftRequest(
        session_id=m.session_id,
        context=list(m.context_token_ids),
        lookahead=m.lookahead,
        max_tokens=m.max_tokens,
        sampling=sampling_from_pb(m.sampling),
        seed=m.seed,
        tree=tree_from_pb(m.tree),
        prefix_length=m.context_prefix_length,
        prefix_hash=m.context_prefix_hash,
    )


def draft_request_to_pb(r: DraftRequest) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(
        session_id=r.session_id,
        context_token_ids=list(r.context),
        lookahead=r.lookahead,
        max_tokens=r.max_tokens,
        sampling=sampling_to_pb(r.sampling),
        seed=r.seed,
        tree=tree_to_pb(r.tree) if not r.tree.is_chain else None,
        context_prefix_length=r.prefix_length,
        context_prefix_hash=r.prefix_hash,
    )


def draft_chunk_to_pb(c: DraftChunk) -> drafter_pb2.DraftResponse:
    return drafter_pb2.DraftResponse(
        tokens=draft_tokens_to_pb(c.tokens), start_position=c.start_position, stats=stats_to_pb(c.stats), last=c.last
    )


def draft_chunk_from_pb(m: drafter_pb2.DraftResponse) -> DraftChunk:
    return DraftChunk(draft_tokens_from_pb(m.tokens), m.start_position, stats_from_pb(m.stats), m.last)


# --- the schedule of a generation (GenerationTimeline) ------------------------------------------

_OUTCOME_TO_PB = {o: generation_pb2.VerificationOutcome.Value(f"VERIFICATION_OUTCOME_{o.upper()}") for o in OUTCOMES}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}


def timeline_to_pb(t: Timeline) -> generation_pb2.GenerationTimeline:
    return generation_pb2.GenerationTimeline(
        strategy=generation_pb2.Strategy.Value(f"STRATEGY_{t.strategy.upper()}"),
        prompt_tokens=t.prompt_tokens,
        targets=t.targets,
        drafters=t.drafters,
        verifications=[
            generation_pb2.TimelineVerification(
                id=v.id,
                target=v.target,
                base=v.base,
                drafts=v.drafts,
                frontier=v.frontier,
                sent_seconds=v.sent,
                completed_seconds=v.completed,
                ended_seconds=v.ended,
                accepted=v.accepted,
                outcome=_OUTCOME_TO_PB.get(v.outcome, generation_pb2.VERIFICATION_OUTCOME_UNSPECIFIED),
            )
            for v in t.verifications
        ],
        draft_streams=[
            generation_pb2.TimelineDraftStream(
                id=s.id,
                drafter=s.drafter,
                start=s.start,
                opened_seconds=s.opened,
                ended_seconds=s.ended,
                cancelled=s.cancelled,
            )
            for s in t.draft_streams
        ],
        draft_chunks=[
            generation_pb2.TimelineDraftChunk(
                stream=c.stream, start=c.start, tokens=c.tokens, received_seconds=c.received
            )
            for c in t.draft_chunks
        ],
        commits=[
            generation_pb2.TimelineCommit(
                position=c.position, token_id=c.token_id, draft_token_id=c.draft_token_id, committed_seconds=c.at
            )
            for c in t.commits
        ],
        wall_seconds=t.wall_seconds,
    )


def timeline_from_pb(m: generation_pb2.GenerationTimeline) -> Timeline:
    strategy = generation_pb2.Strategy.Name(m.strategy).removeprefix("STRATEGY_").lower()
    return Timeline(
        strategy=strategy,
        prompt_tokens=m.prompt_tokens,
        targets=list(m.targets),
        drafters=list(m.drafters),
        verifications=[
            VerificationSpan(
                id=v.id,
                target=v.target,
                base=v.base,
                drafts=v.drafts,
                frontier=v.frontier,
                sent=v.sent_seconds,
                ended=v.ended_seconds,
                completed=v.completed_seconds if v.HasField("completed_seconds") else None,
                accepted=v.accepted if v.HasField("accepted") else None,
                outcome=_OUTCOME_FROM_PB.get(v.outcome, ""),
            )
            for v in m.verifications
        ],
        draft_streams=[
            DraftStreamSpan(s.id, s.drafter, s.start, s.opened_seconds, s.ended_seconds, s.cancelled)
            for s in m.draft_streams
        ],
        draft_chunks=[DraftChunkMark(c.stream, c.start, c.tokens, c.received_seconds) for c in m.draft_chunks],
        commits=[
            CommitMark(
                c.position,
                c.token_id,
                c.draft_token_id if c.HasField("draft_token_id") else None,
                c.committed_seconds,
            )
            for c in m.commits
        ],
        wall_seconds=m.wall_seconds,
    )
