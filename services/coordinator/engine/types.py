"""What a generation is asked to do and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dsi.domain.types import CHAIN, GREEDY, SamplingParams, TreeShape


class Strategy(str, Enum):
    NONSI = "nonsi"
    SI = "si"
    DSI = "dsi"


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    #: Keys every random choice (dsi.domain.sampling): the same seed gives the
    #: same tokens under every strategy.
    seed: int = 0
    strategy: Strategy = Strategy.DSI
    lookahead: int = 5
    #: drafts as a token tree of this shape (SI and DSI); CHAIN = one guess per position
    tree: TreeShape = CHAIN


@dataclass
class GenerationStats:
    new_tokens: int = 0
    wall_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    target_forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    #: drafted tokens whose position was decided while they were the draft there
    decided_drafts: int = 0
    verifications_started: int = 0
    verifications_cancelled: int = 0
    preemptions: int = 0
    draft_streams: int = 0
    #: the seed the generation used (drawn at random when the request gave none)
    seed: int = 0
    #: committed tokens that were a drafter's alternative (a tree node off its main path)
    alternative_hits: int = 0
    #: verifications issued again on another replica after theirs failed (failover)
    failovers: int = 0
    #: drafter streams that failed (the generation went on without that drafter for a while)
    drafter_failures: int = 0
    #: tokens committed while no drafter was in service (target-only steps)
    tokens_without_drafter: int = 0
    #: each drafter's part (services.coordinator.engine.drafters.DrafterStats), the primary first
    drafters: list[Any] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.decided_drafts if self.decided_drafts else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(vars(self))
        out["acceptance_rate"] = self.acceptance_rate
        out["drafters"] = [{**vars(d), "acceptance_rate": d.acceptance_rate} for d in self.drafters]
        return out
