"""The schedule of one generation: what ran where, when, and how it ended.

The coordinator records it (``services/coordinator/timeline.py``, an engine
observer), sends it in the last ``GenerateResponse`` when the request asked
for it (:mod:`dsi.wire.convert`), and ``dsi generate --timeline`` draws it
(:mod:`dsi.tools.timeline`). Times are seconds since the coordinator started
the generation, on its clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: How a verification ended (the engine's ``Outcome`` values).
OUTCOMES = ("decided", "useless", "stale", "preempted", "failed", "abandoned")


@dataclass
class VerificationSpan:
    id: int
    target: int  # index into Timeline.targets
    base: int  # first position it decides
    drafts: int  # draft tokens it carried
    frontier: bool
    sent: float
    ended: float = 0.0
    completed: float | None = None  # None: its result never arrived
    accepted: int | None = None
    outcome: str = ""  # one of OUTCOMES once ended

    @property
    def end_position(self) -> int:
        """The last position it decides (the token after its drafts)."""
        return self.base + self.drafts


@dataclass
class DraftStreamSpan:
    id: int
    drafter: int  # index into Timeline.drafters
    start: int  # position of its first draft
    opened: float
    ended: float = 0.0
    cancelled: bool = False


@dataclass(frozen=True)
class DraftChunkMark:
    stream: int
    start: int
    tokens: int
    received: float


@dataclass(frozen=True)
class CommitMark:
    position: int
    token_id: int
    draft_token_id: int | None  # None: no draft there; != token_id: a rejection
    at: float

    @property
    def rejected(self) -> bool:
        return self.draft_token_id is not None and self.draft_token_id != self.token_id


@dataclass
class Timeline:
    strategy: str
    prompt_tokens: int
    targets: list[str] = field(default_factory=list)
    drafters: list[str] = field(default_factory=list)
    verifications: list[VerificationSpan] = field(default_factory=list)
    draft_streams: list[DraftStreamSpan] = field(default_factory=list)
    draft_chunks: list[DraftChunkMark] = field(default_factory=list)
    commits: list[CommitMark] = field(default_factory=list)
    wall_seconds: float = 0.0

    def outcome_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOMES, 0)
        for v in self.verifications:
            if v.outcome in counts:
                counts[v.outcome] += 1
        return counts
