"""Records the schedule of one generation (``GenerateRequest.timeline``).

:class:`TimelineRecorder` is an engine :class:`Observer`: every hook appends
to a :class:`dsi.domain.timeline.Timeline`, with times relative to the
recorder's creation (just before the generation starts). Nothing is computed
until the generation has ended, so a hook costs an append.
"""

from __future__ import annotations

import time

from dsi.domain.timeline import CommitMark, DraftChunkMark, DraftStreamSpan, Timeline, VerificationSpan
from services.coordinator.engine.observe import DraftChunkInfo, Observer, Outcome, VerificationInfo


class TimelineRecorder(Observer):
    def __init__(self, strategy: str, prompt_tokens: int) -> None:
        self.t0 = time.perf_counter()
        self.timeline = Timeline(strategy, prompt_tokens)
        self._verifications: dict[int, VerificationSpan] = {}
        self._streams: dict[int, DraftStreamSpan] = {}
        self._lanes: dict[str, dict[object, int]] = {"target": {}, "drafter": {}}

    def _lane(self, kind: str, key: object, name: str) -> int:
        """The lane of a replica (``key``: its pool index) or drafter; two
        with the same name (in-process backends) get distinct labels."""
        lanes = self._lanes[kind]
        if key not in lanes:
            lanes[key] = len(lanes)
            names = self.timeline.targets if kind == "target" else self.timeline.drafters
            names.append(name if name not in names else f"{name} #{key}")
        return lanes[key]

    def _t(self, at: float) -> float:
        return at - self.t0

    # --- Observer -------------------------------------------------------------------

    def verification_started(self, v: VerificationInfo) -> None:
        span = VerificationSpan(
            v.id, self._lane("target", v.replica, v.replica_name), v.base, v.drafts, v.frontier, self._t(v.started)
        )
        self._verifications[v.id] = span
        self.timeline.verifications.append(span)

    def verification_completed(self, v: VerificationInfo, at: float, accepted: int) -> None:
        span = self._verifications[v.id]
        span.completed, span.accepted = self._t(at), accepted

    def verification_ended(self, v: VerificationInfo, outcome: Outcome, at: float) -> None:
        span = self._verifications.pop(v.id)
        span.ended, span.outcome = self._t(at), outcome.value

    def draft_stream_started(self, stream: int, drafter: str, start: int, at: float) -> None:
        span = DraftStreamSpan(stream, self._lane("drafter", drafter, drafter), start, self._t(at))
        self._streams[stream] = span
        self.timeline.draft_streams.append(span)

    def draft_chunk(self, chunk: DraftChunkInfo) -> None:
        self.timeline.draft_chunks.append(
            DraftChunkMark(chunk.stream, chunk.start, chunk.tokens, self._t(chunk.received))
        )

    def draft_stream_ended(self, stream: int, at: float, cancelled: bool) -> None:
        span = self._streams.pop(stream)
        span.ended, span.cancelled = self._t(at), cancelled

    def committed(self, position: int, token: int, draft: int | None, at: float) -> None:
        self.timeline.commits.append(CommitMark(position, token, draft, self._t(at)))

    # --- result ---------------------------------------------------------------------

    def finish(self) -> Timeline:
        """The timeline; anything still open (it should not be) ends now."""
        now = self._t(time.perf_counter())
        for span in self._verifications.values():
            span.ended, span.outcome = now, span.outcome or Outcome.ABANDONED.value
        for stream in self._streams.values():
            stream.ended, stream.cancelled = now, True
        self._verifications.clear()
        self._streams.clear()
        self.timeline.wall_seconds = now
        return self.timeline
