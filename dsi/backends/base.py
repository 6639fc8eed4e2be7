"""In-process Target and Drafter built on a model-specific core.

A backend supplies the model work (:class:`TargetModel`,
:class:`DrafterModel`); this module adds what every backend needs: request
validation, bounded sessions, one-forward-at-a-time device access,
cancellation, the decision math and the counters.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsi.domain import sampling, validation
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.sessions import SessionStore
from dsi.domain.types import (
    DraftChunk,
    DraftRequest,
    DraftToken,
    ForwardStats,
    ModelInfo,
    SamplingParams,
    ServiceCounters,
    ServiceInfo,
    ServiceLimits,
    VerifyRequest,
    VerifyResult,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forward:
    """What one forward pass produced."""

    rows: np.ndarray  # (n, vocab) scores for the last n positions
    cached_tokens: int
    computed_tokens: int
    seconds: float


class TargetModel(abc.ABC):
    """Model work of a target: logits for the last positions of a sequence."""

    info: ModelInfo

    @abc.abstractmethod
    def new_state(self) -> Any:
        """Per-session state (a KV cache, say)."""

    @abc.abstractmethod
    async def forward(self, state: Any, tokens: Sequence[int], num_rows: int) -> Forward:
        """Scores predicting positions ``len(tokens) - num_rows + 1`` ..
        ``len(tokens)``, i.e. row ``i`` follows ``tokens[: len - num_rows + i + 1]``.
        Reuses and updates ``state``."""

    def drop_state(self, state: Any) -> None:  # noqa: B027 - optional hook
        """Free what ``state`` holds (called when a session is dropped)."""


class DrafterModel(abc.ABC):
    """Model work of a drafter: the next-token distribution."""

    info: ModelInfo

    @abc.abstractmethod
    def new_state(self) -> Any: ...

    @abc.abstractmethod
    async def next_scores(
        self, state: Any, tokens: Sequence[int], params: SamplingParams, seed: int
    ) -> tuple[np.ndarray, Forward]:
        """Logits for the token after ``tokens``; the drafter proposes
        :func:`dsi.domain.sampling.choose` of them (the decision rule the
        target applies, on the drafter's own distribution)."""

    def drop_state(self, state: Any) -> None:  # noqa: B027 - optional hook
        ...


class _Device:
    """One device: forward passes run one at a time, in arrival order."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()


class LocalTarget(Target):
    def __init__(
        self,
        model: TargetModel,
        max_sessions: int = 256,
        session_idle_timeout: float = 600.0,
        max_draft_tokens: int = 64,
    ) -> None:
        self.model = model
        self.name = f"local-target:{model.info.model_id}"
        self.limits = ServiceLimits(
            max_draft_tokens=max_draft_tokens,
            max_sessions=max_sessions,
            session_idle_timeout_seconds=session_idle_timeout,
        )
        self.sessions: SessionStore[Any] = SessionStore(
            model.new_state, max_sessions, session_idle_timeout, on_drop=model.drop_state
        )
        self.counters = ServiceCounters()
        #: Called with every forward pass (metrics, see dsi/serving/metrics.py); None = nothing to call.
        self.on_forward: Callable[[Forward], None] | None = None
        self._device = _Device()

    async def info(self) -> ServiceInfo:
        self.counters.sessions = len(self.sessions)
        self.counters.busy_sessions = self.sessions.busy
        self.counters.evicted_sessions = self.sessions.evicted
        return ServiceInfo(self.model.info, self.limits, ServiceCounters(**vars(self.counters)))

    def check(self, request: VerifyRequest) -> None:
        info = self.model.info
        validation.check_session_id(request.session_id)
        validation.check_context(request.context, info.vocab_size, info.max_context_tokens, len(request.drafts))
        validation.check_drafts(request.drafts, info.vocab_size, self.limits.max_draft_tokens)

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        self.check(request)
        tokens = list(request.context) + [d.token_id for d in request.drafts]
        queued = time.perf_counter()
        try:
            async with self.sessions.use(request.session_id) as state:
                async with self._device.lock:
                    waited = time.perf_counter() - queued
                    fwd = await self.model.forward(state, tokens, len(request.drafts) + 1)
        except asyncio.CancelledError:
            self.counters.cancelled_requests += 1
            raise
        self.counters.forward_passes += 1
        self.counters.computed_tokens += fwd.computed_tokens
        self.counters.cached_tokens += fwd.cached_tokens
        self.counters.requests += 1
        if self.on_forward is not None:
            self.on_forward(fwd)
        decisions, num_accepted, nxt = sampling.verify_rows(
            fwd.rows, request.drafts, request.sampling, request.seed, len(request.context)
        )
        stats = ForwardStats(fwd.cached_tokens, fwd.computed_tokens, waited, fwd.seconds)
        return VerifyResult(decisions, num_accepted, nxt, stats)

    async def release_session(self, session_id: str) -> bool:
        return self.sessions.release(session_id)


class LocalDrafter(Drafter):
    def __init__(
        self,
        model: DrafterModel,
        max_sessions: int = 256,
        session_idle_timeout: float = 600.0,
        max_lookahead: int = 64,
    ) -> None:
        self.model = model
        self.name = f"local-drafter:{model.info.model_id}"
        self.limits = ServiceLimits(
            max_lookahead=max_lookahead,
            max_sessions=max_sessions,
            session_idle_timeout_seconds=session_idle_timeout,
        )
        self.sessions: SessionStore[Any] = SessionStore(
            model.new_state, max_sessions, session_idle_timeout, on_drop=model.drop_state
        )
        self.counters = ServiceCounters()
        #: Called with every forward pass (metrics, see dsi/serving/metrics.py); None = nothing to call.
        self.on_forward: Callable[[Forward], None] | None = None
        self.active_streams = 0
        self._device = _Device()

    async def info(self) -> ServiceInfo:
        self.counters.sessions = len(self.sessions)
        self.counters.busy_sessions = self.sessions.busy
        self.counters.evicted_sessions = self.sessions.evicted
        return ServiceInfo(self.model.info, self.limits, ServiceCounters(**vars(self.counters)))

    def check(self, request: DraftRequest) -> None:
        info = self.model.info
        validation.check_session_id(request.session_id)
        validation.check_lookahead(request.lookahead, self.limits.max_lookahead)
        validation.check_context(request.context, info.vocab_size, info.max_context_tokens, 1, "token to draft")
        if request.max_tokens < 0:
            raise validation.InvalidArgument("max_tokens must be >= 0")

    async def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        self.check(request)
        info = self.model.info
        room = info.max_context_tokens - len(request.context)
        budget = min(request.max_tokens, room) if request.max_tokens else room
        eos = set(info.eos_token_ids)
        tokens = list(request.context)
        self.active_streams += 1
        try:
            async with self.sessions.use(request.session_id) as state:
                drafted = 0
                while drafted < budget:
                    chunk: list[DraftToken] = []
                    stats = ForwardStats()
                    start = len(tokens)
                    while len(chunk) < request.lookahead and drafted < budget:
                        queued = time.perf_counter()
                        async with self._device.lock:
                            waited = time.perf_counter() - queued
                            scores, fwd = await self.model.next_scores(state, tokens, request.sampling, request.seed)
                        tok = DraftToken(sampling.choose(scores, request.sampling, request.seed, len(tokens)))
                        self.counters.forward_passes += 1
                        self.counters.computed_tokens += fwd.computed_tokens
                        self.counters.cached_tokens += fwd.cached_tokens
                        self.counters.drafted_tokens += 1
                        if self.on_forward is not None:
                            self.on_forward(fwd)
                        stats = stats + ForwardStats(fwd.cached_tokens, fwd.computed_tokens, waited, fwd.seconds)
                        chunk.append(tok)
                        tokens.append(tok.token_id)
                        drafted += 1
                        if tok.token_id in eos:
                            budget = drafted
                    yield DraftChunk(chunk, start, stats)
            self.counters.requests += 1
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or closed the stream
            self.counters.cancelled_requests += 1
            raise
        finally:
            self.active_streams -= 1

    async def release_session(self, session_id: str) -> bool:
        return self.sessions.release(session_id)
