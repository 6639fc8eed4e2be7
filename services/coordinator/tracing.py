"""The coordinator's spans: one per generation, per verification, per draft
stream (an engine :class:`Observer`), when tracing is on (:mod:`dsi.serving.tracing`).

* ``generate`` (INTERNAL): the whole generation, a child of the ``Generate``
  RPC's span (or a root span for the OpenAI-compatible HTTP API). Attributes:
  the parameters, then the statistics and the finish reason; an event per
  rejected draft.
* ``Verify`` (CLIENT), a child of ``generate``: one per verification, from the
  moment it was sent to the moment it stopped mattering. Attributes: replica,
  base position, drafts, frontier step or speculative chunk, accepted drafts,
  and ``dsi.outcome`` (decided, useless, stale, preempted, failed, abandoned);
  an event ``completed`` when its result arrived. Its RPC carries this span's
  context, so the target's own ``Verify`` span (and the forward pass under it)
  is its child.
* ``Draft`` (CLIENT), a child of ``generate``: one per draft stream, with an
  event per chunk received; the drafter's spans are its children.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dsi.serving import tracing
from services.coordinator.engine.observe import DraftChunkInfo, Observer, Outcome, VerificationInfo

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from services.coordinator.coordinator import GenerateInput
    from services.coordinator.engine import Generation


class TracingObserver(Observer):
    """Opens the spans of one generation; :meth:`finished` closes them."""

    def __init__(self, generation: Generation, req: GenerateInput) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        self._trace = trace
        self._client = SpanKind.CLIENT
        self.tracer = tracing.tracer()
        self.clock = tracing.Clock()
        self.session_id = generation.session_id
        p = generation.params
        self.span = self.tracer.start_span(
            "generate",
            kind=SpanKind.INTERNAL,
            attributes={
                "dsi.session_id": generation.session_id,
                "dsi.strategy": p.strategy.value,
                "dsi.lookahead": p.lookahead,
                "dsi.max_new_tokens": p.max_new_tokens,
                "dsi.seed": str(p.seed),  # may exceed int64 span attributes in other tools
                "dsi.temperature": p.sampling.temperature,
                "dsi.prompt_tokens": generation.prompt_len,
                "dsi.timeline": req.timeline,
            },
        )
        self._parent = trace.set_span_in_context(self.span)
        tracing.session_span(self.session_id, self.span)
        self._verifications: dict[int, tuple[Span, tuple]] = {}
        self._streams: dict[int, tuple[Span, tuple, list[int]]] = {}

    # --- verifications ---------------------------------------------------------------

    def verification_started(self, v: VerificationInfo) -> None:
        span = self.tracer.start_span(
            "Verify",
            context=self._parent,
            kind=self._client,
            start_time=self.clock.ns(v.started),
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "dsi.v1.TargetService",
                "rpc.method": "Verify",
                "dsi.verification": v.id,
                "dsi.replica": v.replica_name,
                "dsi.replica_index": v.replica,
                "dsi.base": v.base,
                "dsi.drafts": v.drafts,
                "dsi.frontier": v.frontier,
            },
        )
        key = tracing.verify_key(self.session_id, v.base, v.drafts)
        tracing.expect_call(key, span)
        self._verifications[v.id] = (span, key)

    def verification_completed(self, v: VerificationInfo, at: float, accepted: int) -> None:
        span, _ = self._verifications[v.id]
        span.set_attribute("dsi.accepted", accepted)
        span.add_event("completed", {"dsi.accepted": accepted}, timestamp=self.clock.ns(at))

    def verification_ended(self, v: VerificationInfo, outcome: Outcome, at: float) -> None:
        span, key = self._verifications.pop(v.id)
        tracing.unexpect_call(key, span)
        span.set_attribute("dsi.outcome", outcome.value)
        if outcome is Outcome.FAILED:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, "the Verify RPC failed"))
        span.end(end_time=self.clock.ns(at))

    # --- draft streams ---------------------------------------------------------------

    def draft_stream_started(self, stream: int, drafter: str, start: int, at: float) -> None:
        span = self.tracer.start_span(
            "Draft",
            context=self._parent,
            kind=self._client,
            start_time=self.clock.ns(at),
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "dsi.v1.DrafterService",
                "rpc.method": "Draft",
                "dsi.stream": stream,
                "dsi.drafter": drafter,
                "dsi.start": start,
            },
        )
        key = tracing.draft_key(self.session_id, start)
        tracing.expect_call(key, span)
        self._streams[stream] = (span, key, [0, 0])

    def draft_chunk(self, chunk: DraftChunkInfo) -> None:
        entry = self._streams.get(chunk.stream)
        if entry is None:
            return
        span, _, counts = entry
        counts[0] += 1
        counts[1] += chunk.tokens
        span.add_event(
            "chunk", {"dsi.start": chunk.start, "dsi.tokens": chunk.tokens}, timestamp=self.clock.ns(chunk.received)
        )

    def draft_stream_ended(self, stream: int, at: float, cancelled: bool) -> None:
        span, key, (chunks, tokens) = self._streams.pop(stream)
        tracing.unexpect_call(key, span)
        span.set_attributes({"dsi.chunks": chunks, "dsi.drafted_tokens": tokens, "dsi.cancelled": cancelled})
        span.end(end_time=self.clock.ns(at))

    # --- commits ----------------------------------------------------------------------

    def committed(self, position: int, token: int, draft: int | None, at: float) -> None:
        if draft is not None and draft != token:
            self.span.add_event(
                "rejected", {"dsi.position": position, "dsi.draft": draft, "dsi.token": token}, self.clock.ns(at)
            )

    # --- the end ------------------------------------------------------------------------

    def finished(self, generation: Generation, error: BaseException | None) -> None:
        """Close what is still open (nothing, normally) and the generation's span."""
        import asyncio

        from opentelemetry.trace import Status, StatusCode

        for span, key in self._verifications.values():
            tracing.unexpect_call(key, span)
            span.set_attribute("dsi.outcome", Outcome.ABANDONED.value)
            span.end()
        for span, key, _ in self._streams.values():
            tracing.unexpect_call(key, span)
            span.end()
        self._verifications.clear()
        self._streams.clear()
        tracing.session_span(self.session_id, None)
        stats: dict[str, Any] = generation.stats.as_dict()
        stats["seed"] = str(stats["seed"])
        self.span.set_attributes({f"dsi.{k}": v for k, v in stats.items()})
        if generation.finish_reason is not None:
            self.span.set_attribute("dsi.finish_reason", generation.finish_reason.value)
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            self.span.set_attribute("dsi.cancelled", True)
        elif error is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


def observe(generation: Generation, req: GenerateInput) -> TracingObserver | None:
    """A tracing observer for ``generation`` when tracing is on."""
    return TracingObserver(generation, req) if tracing.enabled() else None
