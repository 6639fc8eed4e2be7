"""What a generation does, as it happens: the hook for timelines and traces.

A :class:`Observer` attached to a generation (``Generation.observer``) hears
of every verification (where it ran, what it covered, how it ended), every
draft stream and chunk, and every committed token. With no observer the
engine only tests ``observer is not None``. Times are ``time.perf_counter()``
seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    """How a verification ended."""

    #: its result committed at least one token
    DECIDED = "decided"
    #: every position it covers was decided by another verification first, or the generation reached
    #: its end (length, EOS, a stop string) while it was live
    USELESS = "useless"
    #: cancelled because a token it assumed was rejected
    STALE = "stale"
    #: cancelled to give its replica to a frontier step
    PREEMPTED = "preempted"
    #: its RPC failed
    FAILED = "failed"
    #: the generation was cut short (its client gone, an error) while it was live
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class VerificationInfo:
    id: int
    replica: int  # index in the target pool
    replica_name: str
    base: int  # first position it decides
    drafts: int  # draft tokens it carries
    frontier: bool  # issued because nothing covered the frontier
    started: float


@dataclass(frozen=True)
class DraftChunkInfo:
    stream: int
    start: int  # position of its first token
    tokens: int
    received: float


class Observer:
    """Override what you need; every hook defaults to doing nothing."""

    def verification_started(self, v: VerificationInfo) -> None:
        """A Verify RPC was sent."""

    def verification_completed(self, v: VerificationInfo, at: float, accepted: int) -> None:
        """Its result arrived (``accepted``: leading drafts the target accepted)."""

    def verification_ended(self, v: VerificationInfo, outcome: Outcome, at: float) -> None:
        """It will not be used any more (called once per verification)."""

    def draft_stream_started(self, stream: int, drafter: str, start: int, at: float) -> None:
        """A Draft stream was opened for positions from ``start`` on."""

    def draft_chunk(self, chunk: DraftChunkInfo) -> None:
        """A chunk of drafts arrived."""

    def draft_stream_ended(self, stream: int, at: float, cancelled: bool) -> None:
        """The stream finished (``cancelled``: stopped by the coordinator)."""

    def committed(self, position: int, token: int, draft: int | None, at: float) -> None:
        """``token`` was committed at ``position``; ``draft`` was the pending
        draft there (None: there was none; a different id: a rejection)."""
