"""In-process Target and Drafter built on a model-specific core.

A backend supplies the model work (:class:`TargetModel`,
:class:`DrafterModel`); this module adds what every backend needs: request
validation, bounded sessions, one-forward-at-a-time device access,
cancellation, the decision math and the counters.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsi.backends.batching import BatchItem, BatchLimits, DeviceQueue
from dsi.domain import prefix, sampling, validation
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.sessions import SessionStore
from dsi.domain.types import (
    ROOT,
    Decision,
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
    is_chain,
    tree_parents,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forward:
    """What one forward pass produced."""

    #: (n, vocab) scores for the last n positions: a numpy array, or a tensor on the
    #: model's device (Hugging Face), decided there by :meth:`TargetModel.decide`
    scores: Any
    cached_tokens: int
    computed_tokens: int
    seconds: float

    @property
    def rows(self) -> np.ndarray:
        """The scores as a numpy array on the host (a device tensor is copied whole)."""
        if isinstance(self.scores, np.ndarray):
            return self.scores
        if hasattr(self.scores, "cpu"):  # a torch tensor
            return self.scores.float().cpu().numpy()
        return np.asarray(self.scores)  # e.g. the synthetic backend's sparse rows


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

    @abc.abstractmethod
    async def forward_tree(
        self, state: Any, context: Sequence[int], tokens: Sequence[int], parents: Sequence[int]
    ) -> Forward:
        """One forward pass over ``context`` and a tree of draft ``tokens``
        (``parents[i]``: the index of token i's parent, ``ROOT`` = the context
        end, parents before children). Row 0 follows the context, row
        ``1 + i`` follows token ``i`` and its ancestors. The state may then
        hold the whole tree until :meth:`keep_path`."""

    @abc.abstractmethod
    async def keep_path(
        self, state: Any, context: Sequence[int], path_tokens: Sequence[int], path: Sequence[int]
    ) -> None:
        """After :meth:`forward_tree`: keep in ``state`` only the context and
        the accepted path (draft indices ``path`` with tokens ``path_tokens``),
        as if they had been computed as one sequence."""

    def drop_state(self, state: Any) -> None:  # noqa: B027 - optional hook
        """Free what ``state`` holds (called when a session is dropped)."""

    #: True when :meth:`decide` works on the model's device: the decision is then made
    #: before the next forward pass may start (it uses the device, and the scores on it).
    decides_on_device: bool = False

    async def decide(self, request: VerifyRequest, fwd: Forward) -> tuple[list[Decision], list[int], int]:
        """Decisions, accepted path and next token from a forward pass's
        scores (:func:`dsi.domain.sampling.verify_rows` on the host; a backend
        whose scores live on a device may decide there)."""
        return sampling.verify_rows(fwd.rows, request.drafts, request.sampling, request.seed, len(request.context))

    async def forward_batch(self, items: list[BatchItem]) -> list[Forward]:
        """:meth:`forward` for several sessions in one pass (continuous
        batching, :mod:`dsi.backends.batching`); the results must equal the
        unbatched ones. This default runs them one after the other."""
        return [await self.forward(i.state, i.tokens, i.num_rows) for i in items]

    def tokens_to_compute(self, state: Any, tokens: Sequence[int], num_rows: int) -> int:
        """How many tokens :meth:`forward` would compute (its share of a
        batch's token budget); the default assumes a warm cache."""
        return num_rows


@dataclass(frozen=True)
class DraftItem:
    """One drafter step of a batched pass: the ``k`` best guesses after ``tokens``."""

    state: Any
    tokens: Sequence[int]
    params: SamplingParams
    seed: int
    k: int


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

    async def next_candidates(
        self, state: Any, tokens: Sequence[int], params: SamplingParams, seed: int, k: int
    ) -> tuple[list[int], Forward]:
        """The ``k`` best guesses of the target's token after ``tokens``, best
        first: the decision rule's choice on the drafter's scores, then its
        runners-up (:func:`dsi.domain.sampling.top_candidates`)."""
        scores, fwd = await self.next_scores(state, tokens, params, seed)
        return sampling.top_candidates(scores, params, seed, len(tokens), k), fwd

    async def next_candidates_batch(self, items: list[DraftItem]) -> list[tuple[list[int], Forward]]:
        """:meth:`next_candidates` for the steps of several streams in one
        pass; the default runs them one after the other."""
        return [await self.next_candidates(i.state, i.tokens, i.params, i.seed, i.k) for i in items]

    def drop_state(self, state: Any) -> None:  # noqa: B027 - optional hook
        ...


def _needs_prefix(length: int) -> Callable[[], Exception] | None:
    """For :meth:`SessionStore.use`: a request naming a prefix of ``length``
    tokens needs a session that exists (else it is refused before a session
    is created, or another one evicted for it)."""
    return (lambda: prefix.not_held(length)) if length else None


class _Session:
    """A target's or a drafter's session: the model's state and the last
    sequence received (what a request's context prefix refers to, see
    dsi.domain.prefix): a target's is a request's context and its chain
    drafts, a drafter's a request's context."""

    __slots__ = ("model", "received")

    def __init__(self, model_state: Any) -> None:
        self.model = model_state
        self.received = prefix.HashedSequence()


def _session_store(model: TargetModel | DrafterModel, max_sessions: int, idle_timeout: float) -> SessionStore[_Session]:
    """A service's sessions: each the model's state (dropped with it) and what it received."""
    return SessionStore(
        lambda: _Session(model.new_state()),
        max_sessions,
        idle_timeout,
        on_drop=lambda s: model.drop_state(s.model),
    )


class LocalTarget(Target):
    def __init__(
        self,
        model: TargetModel,
        max_sessions: int = 256,
        session_idle_timeout: float = 600.0,
        max_draft_tokens: int = 64,
        batch: BatchLimits | None = None,
    ) -> None:
        self.model = model
        self.name = f"local-target:{model.info.model_id}"
        batch = batch or BatchLimits(max_batch=1)  # in-process default: one request per pass
        self.limits = ServiceLimits(
            max_draft_tokens=max_draft_tokens,
            max_sessions=max_sessions,
            session_idle_timeout_seconds=session_idle_timeout,
            max_batch=batch.max_batch,
            max_batch_tokens=batch.max_batch_tokens,
            accepts_context_prefix=True,
        )
        self.sessions = _session_store(model, max_sessions, session_idle_timeout)
        self.counters = ServiceCounters()
        #: Called with every forward pass (metrics, see dsi/serving/metrics.py); None = nothing to call.
        self.on_forward: Callable[[Forward], None] | None = None
        #: The device: waiting chain verifications of different sessions share a pass.
        self.device: DeviceQueue[BatchItem, Forward] = DeviceQueue(model.forward_batch, batch)

    async def info(self) -> ServiceInfo:
        self.counters.sessions = len(self.sessions)
        self.counters.busy_sessions = self.sessions.busy
        self.counters.evicted_sessions = self.sessions.evicted
        self.counters.device_passes = self.device.stats.passes
        self.counters.batched_requests = self.device.stats.batched_requests
        return ServiceInfo(self.model.info, self.limits, ServiceCounters(**vars(self.counters)))

    def check(self, request: VerifyRequest) -> None:
        info = self.model.info
        validation.check_session_id(request.session_id)
        validation.check_context(request.context, info.vocab_size, info.max_context_tokens, len(request.drafts))
        validation.check_drafts(request.drafts, info.vocab_size, self.limits.max_draft_tokens)

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        """One forward pass over the context and the drafts (a chain or a
        tree), then the decisions. After a tree, the session keeps only the
        context and the accepted path. A context given as a prefix of what the
        session received (dsi.domain.prefix) is completed from the session
        first."""
        info = self.model.info
        if request.prefix_length:  # the prefix's ids were checked when they came; its size is checked below
            validation.check_session_id(request.session_id)
            validation.check_token_ids(request.context, info.vocab_size, "context_token_ids")
            validation.check_drafts(request.drafts, info.vocab_size, self.limits.max_draft_tokens)
        else:
            self.check(request)
        ids = [d.token_id for d in request.drafts]
        chain = is_chain(request.drafts)
        queued = asyncio.get_running_loop().time()
        decided: tuple[list[Decision], list[int], int] | None = None
        try:
            async with self.sessions.use(request.session_id, _needs_prefix(request.prefix_length)) as session:
                prefix_length = request.prefix_length
                if prefix_length:
                    full = prefix.resolve(session.received, prefix_length, request.prefix_hash, request.context)
                    request = dataclasses.replace(request, context=full, prefix_length=0, prefix_hash=0)
                    validation.check_context_size(len(full), info.max_context_tokens, len(request.drafts))
                state = session.model
                # --- batching (issue 17): chains share passes; a tree runs alone ---
                if chain:
                    tokens = [*request.context, *ids]
                    cost = self.model.tokens_to_compute(state, tokens, len(ids) + 1)
                    fwd, started = await self.device.batched(BatchItem(state, tokens, len(ids) + 1), cost)
                else:  # the session must keep the accepted path only: decide before releasing the device
                    tree_request = request

                    async def tree() -> tuple[Forward, tuple[list[Decision], list[int], int]]:
                        r = tree_request
                        out = await self.model.forward_tree(state, r.context, ids, tree_parents(r.drafts))
                        kept = await self.model.decide(r, out)
                        await self.model.keep_path(state, r.context, [ids[i] for i in kept[1]], kept[1])
                        return out, kept

                    (fwd, decided), started = await self.device.exclusive(tree)
                waited = started - queued
                # --- end batching ---
                sequence = [*request.context, *ids] if chain else list(request.context)  # what a prefix names
                session.received.replace(
                    sequence, prefix_length or prefix.common_prefix(session.received.tokens, sequence)
                )
            if decided is None:  # a chain: decide once its pass is done (on the device, for a model that can)
                decided = await self.model.decide(request, fwd)
        except asyncio.CancelledError:
            self.counters.cancelled_requests += 1
            raise
        self.counters.forward_passes += 1
        self.counters.computed_tokens += fwd.computed_tokens
        self.counters.cached_tokens += fwd.cached_tokens
        self.counters.requests += 1
        if self.on_forward is not None:
            self.on_forward(fwd)
        decisions, path, nxt = decided
        stats = ForwardStats(fwd.cached_tokens, fwd.computed_tokens, waited, fwd.seconds)
        return VerifyResult(decisions, len(path), nxt, stats, path)

    async def release_session(self, session_id: str) -> bool:
        return self.sessions.release(session_id)


class LocalDrafter(Drafter):
    def __init__(
        self,
        model: DrafterModel,
        max_sessions: int = 256,
        session_idle_timeout: float = 600.0,
        max_lookahead: int = 64,
        batch: BatchLimits | None = None,
    ) -> None:
        self.model = model
        self.name = f"local-drafter:{model.info.model_id}"
        batch = batch or BatchLimits(max_batch=1)  # in-process default: one step per pass
        self.limits = ServiceLimits(
            max_lookahead=max_lookahead,
            max_sessions=max_sessions,
            session_idle_timeout_seconds=session_idle_timeout,
            max_batch=batch.max_batch,
            max_batch_tokens=batch.max_batch_tokens,
            accepts_context_prefix=True,
        )
        self.sessions = _session_store(model, max_sessions, session_idle_timeout)
        self.counters = ServiceCounters()
        #: Called with every forward pass (metrics, see dsi/serving/metrics.py); None = nothing to call.
        self.on_forward: Callable[[Forward], None] | None = None
        self.active_streams = 0
        #: The device: the next-token steps of concurrent streams share a pass.
        self.device: DeviceQueue[DraftItem, tuple[list[int], Forward]] = DeviceQueue(model.next_candidates_batch, batch)

    async def info(self) -> ServiceInfo:
        self.counters.sessions = len(self.sessions)
        self.counters.busy_sessions = self.sessions.busy
        self.counters.evicted_sessions = self.sessions.evicted
        self.counters.device_passes = self.device.stats.passes
        self.counters.batched_requests = self.device.stats.batched_requests
        return ServiceInfo(self.model.info, self.limits, ServiceCounters(**vars(self.counters)))

    def check(self, request: DraftRequest) -> None:
        """The request's fields; with a context prefix, only the tokens after
        it (the prefix's ids were checked when they came; the size of the
        whole is checked once the prefix is resolved, :meth:`_context`)."""
        info = self.model.info
        validation.check_session_id(request.session_id)
        validation.check_lookahead(request.lookahead, self.limits.max_lookahead)
        if request.prefix_length:
            validation.check_token_ids(request.context, info.vocab_size, "context_token_ids")
        else:
            validation.check_context(request.context, info.vocab_size, info.max_context_tokens, 1, "token to draft")
        if request.max_tokens < 0:
            raise validation.InvalidArgument("max_tokens must be >= 0")

    async def _guesses(
        self, state: Any, tokens: list[int], request: DraftRequest, k: int
    ) -> tuple[list[int], ForwardStats]:
        """The ``k`` best guesses after ``tokens`` (one forward pass)."""
        queued = asyncio.get_running_loop().time()
        item = DraftItem(state, list(tokens), request.sampling, request.seed, k)
        (guesses, fwd), started = await self.device.batched(item, 1)
        waited = started - queued
        self.counters.forward_passes += 1
        self.counters.computed_tokens += fwd.computed_tokens
        self.counters.cached_tokens += fwd.cached_tokens
        if self.on_forward is not None:
            self.on_forward(fwd)
        return guesses, ForwardStats(fwd.cached_tokens, fwd.computed_tokens, waited, fwd.seconds)

    async def _continue(
        self, state: Any, prefix: list[int], depth: int, request: DraftRequest, eos: set[int]
    ) -> tuple[list[int], ForwardStats]:
        """Up to ``depth`` best guesses after ``prefix`` (one forward pass
        each; none after an end-of-sequence token)."""
        out: list[int] = []
        stats = ForwardStats()
        while len(out) < depth and [*prefix, *out][-1] not in eos:
            guesses, cost = await self._guesses(state, [*prefix, *out], request, 1)
            stats = stats + cost
            out.append(guesses[0])
        return out, stats

    async def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        """Stream the main path (the best guesses) in chunks of ``lookahead``
        positions.

        With a tree shape each main token comes with its alternatives at once
        (the runners-up of the same forward pass, so free; children of the
        same parent, in order of preference). Their branches (``depth - 1``
        more guesses each, a forward pass per token) follow in a chunk of
        their own after each main chunk, so the main path never waits for
        them. Parents are indices among all tokens of the stream.

        A context given as a prefix of the one the session last received
        (dsi.domain.prefix) is completed from the session first."""
        self.check(request)
        info = self.model.info
        eos = set(info.eos_token_ids)
        shape = request.tree
        sent = 0  # tokens streamed so far: the index of the next one
        last_main = ROOT
        self.active_streams += 1
        try:
            async with self.sessions.use(request.session_id, _needs_prefix(request.prefix_length)) as session:
                state = session.model
                tokens = list(self._context(session, request))
                room = info.max_context_tokens - len(tokens)
                budget = min(request.max_tokens, room) if request.max_tokens else room
                drafted = 0
                while drafted < budget:
                    chunk: list[DraftToken] = []
                    stats = ForwardStats()
                    start = len(tokens)
                    alternatives: list[tuple[int, list[int]]] = []  # (stream index, prefix) to grow a branch from
                    for _ in range(min(request.lookahead, budget - drafted)):
                        guesses, cost = await self._guesses(state, tokens, request, shape.width)
                        stats = stats + cost
                        main = guesses[0]
                        if shape.is_chain:
                            chunk.append(DraftToken(main))
                        else:
                            parent, last_main = last_main, sent + len(chunk)
                            chunk.append(DraftToken(main, parent))
                            for alt in guesses[1:]:
                                alternatives.append((sent + len(chunk), [*tokens, alt]))
                                chunk.append(DraftToken(alt, parent))
                        tokens.append(main)
                        drafted += 1
                        if main in eos:
                            budget = drafted
                            break
                    sent += len(chunk)
                    self.counters.drafted_tokens += len(chunk)
                    branch_next = shape.depth > 1 and bool(alternatives)
                    yield DraftChunk(chunk, start, stats, last=drafted >= budget and not branch_next)
                    if branch_next:
                        branches: list[DraftToken] = []
                        stats = ForwardStats()
                        first = 0
                        for index, prefix in alternatives:
                            more, cost = await self._continue(state, prefix, shape.depth - 1, request, eos)
                            stats = stats + cost
                            first = first or (len(prefix) if more else 0)
                            for j, tok in enumerate(more):
                                branches.append(DraftToken(tok, index if j == 0 else sent + len(branches) - 1))
                        if branches:
                            sent += len(branches)
                            self.counters.drafted_tokens += len(branches)
                            yield DraftChunk(branches, first, stats, last=drafted >= budget)
            self.counters.requests += 1
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or closed the stream
            self.counters.cancelled_requests += 1
            raise
        finally:
            self.active_streams -= 1

    def _context(self, session: _Session, request: DraftRequest) -> list[int]:
        """The request's whole context (its prefix resolved), now what the
        session received (what the next request's prefix names)."""
        length = request.prefix_length
        if length:
            context = prefix.resolve(session.received, length, request.prefix_hash, request.context)
            validation.check_context_size(len(context), self.model.info.max_context_tokens, 1, "token to draft")
        else:
            context = list(request.context)
        session.received.replace(context, length or prefix.common_prefix(session.received.tokens, context))
        return context

    async def release_session(self, session_id: str) -> bool:
        return self.sessions.release(session_id)
