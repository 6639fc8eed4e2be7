"""Prompt lookup: a drafter with no model weights.

It guesses that the text goes on as it did the last time it read the same
words: the last ``n`` tokens of the context are looked up earlier in the
context (the prompt and what was generated so far), and the tokens that
followed that occurrence are proposed. Editing code, answering from a
document, repeating a name: wherever the output copies its input, whole runs
of tokens are accepted for the price of a search.

Spec grammar (every key optional)::

    ngram:n=3,min_n=2,k=8

``n``: the longest n-gram matched, tried first, down to ``min_n``; ``k``: the
most tokens one Draft stream proposes. The most recent occurrence wins. The
copy may run into the proposal itself (a repeating pattern goes on
repeating). With no occurrence the stream ends at once, empty: the drafter
has nothing to say and costs nothing.

**Vocabulary.** The drafter copies token ids without knowing what they mean,
so it serves any vocabulary: its :class:`ModelInfo` says ``vocab_size = 0``
and an empty tokenizer fingerprint, which the coordinator reads as "any
vocabulary" (``services/coordinator/coordinator.py``, ``check_compatible``).

**Losslessness.** A proposal is deterministic: its "distribution" is one
point. The target decides every position with the keyed Gumbel-max rule
(:mod:`dsi.domain.sampling`), which never looks at a draft's distribution, so
the output is the target's whatever the drafter proposes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from dsi.backends.base import Forward
from dsi.domain import validation
from dsi.domain.errors import FailedPrecondition, InvalidArgument
from dsi.domain.interfaces import Drafter
from dsi.domain.types import (
    DraftChunk,
    DraftRequest,
    DraftToken,
    ForwardStats,
    ModelInfo,
    ServiceCounters,
    ServiceInfo,
    ServiceLimits,
)

PREFIX = "ngram"
#: What the drafter reports as its context limit: none of its own (the target's applies).
MAX_CONTEXT = 1 << 20


def is_ngram(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


@dataclass(frozen=True)
class NgramSpec:
    n: int = 3
    min_n: int = 2
    k: int = 8

    @classmethod
    def parse(cls, spec: str) -> NgramSpec:
        head, _, body = spec.partition(":")
        if head != PREFIX:
            raise InvalidArgument(f"not an n-gram drafter spec: {spec!r}")
        known = [f.name for f in fields(cls)]
        values: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise InvalidArgument(f"bad n-gram spec item {item!r}; known keys: {', '.join(known)}")
            try:
                values[key] = int(raw)
            except ValueError:
                raise InvalidArgument(f"n-gram spec: {key} must be an integer, got {raw!r}") from None
        out = cls(**values)
        if not 1 <= out.min_n <= out.n:
            raise InvalidArgument(f"n-gram spec: need 1 <= min_n <= n, got min_n={out.min_n}, n={out.n}")
        if out.k < 1:
            raise InvalidArgument(f"n-gram spec: k must be >= 1, got {out.k}")
        return out

    def model_info(self, spec: str) -> ModelInfo:
        return ModelInfo(
            model_id=spec,
            backend=PREFIX,
            vocab_size=0,  # any vocabulary
            eos_token_ids=(),
            max_context_tokens=MAX_CONTEXT,
            tokenizer_fingerprint="",
            device="cpu",
            dtype="",
        )


def propose(tokens: Sequence[int], n: int, min_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of
    the last ``m`` tokens of ``tokens``, for the largest ``m`` in ``n ..
    min_n`` that occurs; ``[]`` when none does. The copy reads on into its own
    output when it reaches the end of ``tokens``."""
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    # Where the last token occurred before (each such place is followed by a token): the ends of
    # the candidate occurrences, narrowed by one earlier token at a time.
    ends = np.flatnonzero(seq[: length - 1] == seq[-1])
    for m in range(min(n, length - 1), min_n - 1, -1):
        hits = ends[ends >= m - 1]
        for back in range(1, m):
            hits = hits[seq[hits - back] == seq[length - 1 - back]]
        if hits.size:
            source = int(hits[-1]) + 1
            out = list(tokens)
            for i in range(k):
                out.append(out[source + i])
            return out[length:]
    return []


class NgramDrafter(Drafter):
    """A Drafter that proposes by prompt lookup (:func:`propose`): in process
    (``dsi coordinator --drafter ngram:...``) or behind ``dsi drafter --model
    ngram:...``. It holds nothing per session: every stream searches the
    context it is given."""

    def __init__(self, spec: str = PREFIX, max_lookahead: int = 64) -> None:
        self.spec = NgramSpec.parse(spec)
        self.name = spec
        self.model = _Lookup(self.spec.model_info(spec))
        self.limits = ServiceLimits(max_lookahead=max_lookahead)  # no session limit: it keeps no sessions
        self.counters = ServiceCounters()
        self.sessions = _NoSessions()
        self.active_streams = 0
        #: Called with every lookup (metrics, tracing); None = nothing to call.
        self.on_forward: Callable[[Forward], None] | None = None

    async def info(self) -> ServiceInfo:
        return ServiceInfo(self.model.info, self.limits, ServiceCounters(**vars(self.counters)))

    def check(self, request: DraftRequest) -> None:
        if request.prefix_length:  # it does not announce accepts_context_prefix: it holds no context
            raise FailedPrecondition("this drafter keeps no sessions, so no context prefix: send the full context")
        validation.check_session_id(request.session_id)
        validation.check_lookahead(request.lookahead, self.limits.max_lookahead)
        validation.check_context(request.context, MAX_CONTEXT, MAX_CONTEXT, 1, "token to draft")
        if request.max_tokens < 0:
            raise InvalidArgument("max_tokens must be >= 0")

    async def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        """The proposal, in chunks of ``lookahead`` tokens (a chain whatever
        the tree shape asked); no chunk at all when nothing matches."""
        self.check(request)
        k = min(self.spec.k, request.max_tokens) if request.max_tokens else self.spec.k
        started = time.perf_counter()
        proposal = propose(request.context, self.spec.n, self.spec.min_n, k)
        seconds = time.perf_counter() - started
        self.counters.forward_passes += 1
        self.counters.computed_tokens += len(request.context)
        if self.on_forward is not None:
            self.on_forward(Forward(np.zeros((0, 0)), 0, len(request.context), seconds))
        self.active_streams += 1
        try:
            stats = ForwardStats(computed_tokens=len(request.context), compute_seconds=seconds)
            for i in range(0, len(proposal), request.lookahead):
                chunk = [DraftToken(t) for t in proposal[i : i + request.lookahead]]
                self.counters.drafted_tokens += len(chunk)
                last = i + request.lookahead >= len(proposal)
                yield DraftChunk(chunk, len(request.context) + i, stats, last)
                stats = ForwardStats()
            self.counters.requests += 1
        except GeneratorExit:  # the client closed the stream
            self.counters.cancelled_requests += 1
            raise
        finally:
            self.active_streams -= 1

    async def release_session(self, session_id: str) -> bool:
        return False  # nothing held


@dataclass(frozen=True)
class _Lookup:
    """What stands for the model (``.info``), as on the model backends."""

    info: ModelInfo


class _NoSessions:
    """The session counts metrics read: the drafter keeps no sessions."""

    evicted = 0
    busy = 0

    def __len__(self) -> int:
        return 0
