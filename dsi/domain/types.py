"""Domain types shared by models, services and the coordinator.

These mirror the messages of ``protos/dsi/v1`` but know nothing of protobuf;
:mod:`dsi.wire.convert` translates between the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from dsi.domain.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    """Logit warping: temperature, then top-k, then top-p (as in HF generate).

    ``temperature == 0`` is greedy decoding; ``top_p`` is normalised so that
    1.0 means "off" and ``top_k == 0`` means "off".
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0) -> SamplingParams:
        """Validate wire-style values (top_p 0 = off) and build the params."""
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}")
        if not math.isfinite(top_p) or top_p < 0 or top_p > 1:
            raise InvalidArgument(f"top_p must lie in [0, 1] (0 or 1 disables it), got {top_p}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
        return cls(temperature=float(temperature), top_p=float(top_p) if top_p > 0 else 1.0, top_k=int(top_k))


GREEDY = SamplingParams()


@dataclass(frozen=True)
class DraftToken:
    """A guess of the target's token at one position (see dsi.domain.sampling).

    Drafts form a tree: ``parent`` is the index of the draft this one follows
    (in the same request, or the same Draft stream), ``ROOT`` for the end of
    the context, ``None`` for the previous draft (a chain; the first draft of
    a chain follows the context)."""

    token_id: int
    parent: int | None = None


#: ``DraftToken.parent`` of a draft that follows the context directly.
ROOT = -1


def tree_parents(drafts: Sequence[DraftToken]) -> list[int]:
    """Each draft's parent index (``ROOT`` for the context end), the chain
    default filled in."""
    return [i - 1 if d.parent is None else d.parent for i, d in enumerate(drafts)]


def is_chain(drafts: Sequence[DraftToken]) -> bool:
    return all(p == i - 1 for i, p in enumerate(tree_parents(drafts)))


@dataclass(frozen=True)
class TreeShape:
    """The shape of a drafter's token tree: at every position of its main
    path (its best guesses), ``width`` candidates: the main guess and
    ``width - 1`` alternatives (its next best guesses), each alternative
    followed by a branch of ``depth - 1`` more guesses. ``width == 1`` is a
    chain."""

    width: int = 1
    depth: int = 1

    MAX_WIDTH = 16
    MAX_DEPTH = 16

    @classmethod
    def create(cls, width: int = 1, depth: int = 1) -> TreeShape:
        """Validate wire-style values (0 = 1) and build the shape."""
        width, depth = max(width, 1), max(depth, 1)
        if width > cls.MAX_WIDTH or depth > cls.MAX_DEPTH:
            raise InvalidArgument(
                f"tree width must lie in 1..{cls.MAX_WIDTH} and depth in 1..{cls.MAX_DEPTH}, got {width}x{depth}"
            )
        return cls(width, depth)

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """``chain``, ``W`` or ``WxD`` (e.g. ``3x2``: 3 candidates per
        position, alternatives with 2-token branches)."""
        if text.strip().lower() in ("", "chain"):
            return CHAIN
        w, x, d = text.lower().partition("x")
        try:
            return cls.create(int(w), int(d) if x else 1)
        except ValueError:
            raise InvalidArgument(f"a tree shape is 'chain', W or WxD (e.g. 3x2), got {text!r}") from None

    @property
    def is_chain(self) -> bool:
        return self.width <= 1

    @property
    def nodes_per_position(self) -> int:
        return 1 + (self.width - 1) * self.depth

    def __str__(self) -> str:
        return "chain" if self.is_chain else f"{self.width}x{self.depth}"


CHAIN = TreeShape()


@dataclass(frozen=True)
class ForwardStats:
    cached_tokens: int = 0
    computed_tokens: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0

    def __add__(self, other: ForwardStats) -> ForwardStats:
        return ForwardStats(
            self.cached_tokens + other.cached_tokens,
            self.computed_tokens + other.computed_tokens,
            self.queue_seconds + other.queue_seconds,
            self.compute_seconds + other.compute_seconds,
        )


@dataclass(frozen=True)
class VerifyRequest:
    session_id: str
    #: the tokens before the first draft; with ``prefix_length``, only those after the prefix
    context: Sequence[int]
    drafts: Sequence[DraftToken] = ()
    sampling: SamplingParams = GREEDY
    seed: int = 0
    #: > 0: ``context`` follows the first ``prefix_length`` tokens of the last sequence the
    #: session received (see dsi.domain.prefix), whose hash is ``prefix_hash``
    prefix_length: int = 0
    prefix_hash: int = 0


@dataclass(frozen=True)
class Decision:
    accepted: bool
    token_id: int


@dataclass(frozen=True)
class VerifyResult:
    #: one per draft: whether it equals the target's token after its parent, and that token
    decisions: list[Decision]
    num_accepted: int
    next_token: int
    stats: ForwardStats = field(default_factory=ForwardStats)
    #: indices of the accepted drafts, from the root (for a chain: 0 .. num_accepted - 1)
    path: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeRequest:
    """Target-only decoding: ``start`` (a verification without drafts), then
    one more step per token decided, each on the context so far."""

    start: VerifyRequest
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class DraftRequest:
    session_id: str
    #: the tokens to continue; with ``prefix_length``, only those after the prefix
    context: Sequence[int]
    lookahead: int
    max_tokens: int = 0
    sampling: SamplingParams = GREEDY
    seed: int = 0
    tree: TreeShape = CHAIN
    #: > 0: ``context`` follows the first ``prefix_length`` tokens of the last context the
    #: session received (not what it drafted; see dsi.domain.prefix), whose hash is ``prefix_hash``
    prefix_length: int = 0
    prefix_hash: int = 0


@dataclass(frozen=True)
class DraftChunk:
    tokens: list[DraftToken]
    start_position: int
    stats: ForwardStats = field(default_factory=ForwardStats)
    last: bool = False  # the drafter knows no chunk follows in this stream


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    backend: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context_tokens: int
    tokenizer_fingerprint: str
    device: str
    dtype: str
    num_parameters: int = 0
    host: str = ""  # the machine it runs on ("": not reported); with ``device``, who shares a device


@dataclass(frozen=True)
class ServiceLimits:
    max_draft_tokens: int = 0
    max_lookahead: int = 0
    max_sessions: int = 0
    session_idle_timeout_seconds: float = 0.0
    max_batch: int = 0  # requests one device pass may take (0 = not reported: one)
    max_batch_tokens: int = 0  # tokens one device pass may compute
    accepts_context_prefix: bool = False
    accepts_verify_stream: bool = False  # serves TargetService.VerifyStream (target)
    accepts_decode: bool = False  # serves TargetService.Decode (target)
    accepts_draft_stream: bool = False  # serves DrafterService.DraftStream (drafter)


@dataclass
class ServiceCounters:
    sessions: int = 0
    busy_sessions: int = 0
    forward_passes: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    cancelled_requests: int = 0
    drafted_tokens: int = 0
    evicted_sessions: int = 0
    device_passes: int = 0  # passes the device ran (several requests may share one)
    batched_requests: int = 0  # requests that shared their pass with others


@dataclass(frozen=True)
class ServiceInfo:
    """What a target or drafter says about itself (the Info RPC)."""

    model: ModelInfo
    limits: ServiceLimits
    counters: ServiceCounters
