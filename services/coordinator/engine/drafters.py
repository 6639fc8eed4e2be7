"""Several drafters in one generation.

A generation uses one instance of every distinct drafter model the engine has
(replicas of the same model spread generations; different models work on the
same one). The first is the *primary*: its best guesses are the main path
(``Generation.pending``) and its runners-up the alternatives. Every other
drafter's guesses are a :class:`Proposal`: a run of tokens from the position
its stream started at, which the verifications carry as a branch of the token
tree where it leaves the main path (common prefixes collapse into one node).

Each drafter's guesses are accounted for (:class:`DrafterStats`): decided,
accepted, and *unique* (accepted where the main path's guess was wrong). A
secondary drafter that has earned nothing unique after ``DROP_AFTER`` decided
guesses is dropped from the generation: it only cost verification width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsi.domain.interfaces import Drafter
from services.coordinator.pool import Lease

#: Decided guesses after which a secondary drafter with no unique accepted token is dropped.
DROP_AFTER = 48


@dataclass
class DrafterStats:
    """One drafter's part in a generation."""

    drafter: str
    #: its guesses whose position got decided
    decided: int = 0
    #: of those, equal to the committed token
    accepted: int = 0
    #: accepted where the main path's guess was not (what only it contributed)
    unique: int = 0
    #: dropped from the generation for contributing nothing unique
    dropped: bool = False

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.decided if self.decided else 0.0


@dataclass(eq=False)
class DrafterSlot:
    """A drafter model's place in a generation, and the instance of it leased
    now (none while it is *lost*: its instance failed and no other is in
    service; the generation goes on without it)."""

    index: int  # 0 = the primary
    model: str
    client: Drafter | None
    lease: Lease | None
    stats: DrafterStats

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def lost(self) -> bool:
        return self.client is None


@dataclass(eq=False)
class Proposal:
    """A secondary drafter's guesses: ``tokens`` for positions ``start ..``,
    assuming the sequence up to ``start`` that the main path had when its
    stream started."""

    slot: DrafterSlot
    start: int
    tokens: list[int] = field(default_factory=list)
    #: a guess turned out wrong: the ones after it assume it
    dead: bool = False

    def guess_at(self, position: int) -> int | None:
        i = position - self.start
        return self.tokens[i] if not self.dead and 0 <= i < len(self.tokens) else None
