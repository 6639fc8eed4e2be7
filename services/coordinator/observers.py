"""Several engine observers on one generation (a timeline and a trace, say)."""

from __future__ import annotations

from collections.abc import Sequence

from services.coordinator.engine.observe import DraftChunkInfo, Observer, Outcome, VerificationInfo


class Fanout(Observer):
    """Tells every observer, in order."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = list(observers)

    def verification_started(self, v: VerificationInfo) -> None:
        for o in self.observers:
            o.verification_started(v)

    def verification_completed(self, v: VerificationInfo, at: float, accepted: int) -> None:
        for o in self.observers:
            o.verification_completed(v, at, accepted)

    def verification_ended(self, v: VerificationInfo, outcome: Outcome, at: float) -> None:
        for o in self.observers:
            o.verification_ended(v, outcome, at)

    def draft_stream_started(self, stream: int, drafter: str, start: int, at: float) -> None:
        for o in self.observers:
            o.draft_stream_started(stream, drafter, start, at)

    def draft_chunk(self, chunk: DraftChunkInfo) -> None:
        for o in self.observers:
            o.draft_chunk(chunk)

    def draft_stream_ended(self, stream: int, at: float, cancelled: bool) -> None:
        for o in self.observers:
            o.draft_stream_ended(stream, at, cancelled)

    def committed(self, position: int, token: int, draft: int | None, at: float) -> None:
        for o in self.observers:
            o.committed(position, token, draft, at)


def combine(observers: Sequence[Observer | None]) -> Observer | None:
    """None for no observer, the observer itself for one, else a fan-out."""
    present = [o for o in observers if o is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else Fanout(present)
