"""DSI's drafting: a Draft stream per drafter that keeps the generation's
speculation growing while verifications run, stopped when it is far enough
ahead and restarted after a rejection.

The primary drafter's stream extends the main path (``Generation.pending``)
and its alternatives; every other drafter's stream extends its
:class:`~services.coordinator.engine.drafters.Proposal`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from dsi.domain.errors import Unavailable
from dsi.domain.types import DraftChunk, DraftToken
from services.coordinator.engine.drafters import DrafterSlot, Proposal
from services.coordinator.engine.generation import Generation
from services.coordinator.engine.observe import DraftChunkInfo
from services.coordinator.engine.trees import StreamTree
from services.coordinator.pool import clock

#: A drafter's deadline checked this many seconds after it passed: the coordinator was held up, not the drafter.
LATE_CHECK = 0.1


def more_drafts_coming(gen: Generation) -> bool:
    """Whether the main path can grow: not past the last position, and not
    after a drafted end-of-sequence."""
    end = len(gen.committed) + len(gen.pending)
    return end <= gen.last_pos and not (gen.pending and gen.pending[-1].token_id in gen.engine.eos)


class DraftFeed:
    def __init__(self, gen: Generation, slot: DrafterSlot) -> None:
        self.gen = gen
        self.slot = slot
        self._stream: AsyncIterator[DraftChunk] | None = None
        self._stream_id = -1
        self._tree = StreamTree(0)
        self._proposal: Proposal | None = None
        #: (committed, pending) lengths when a stream ended by itself: it said all it had to say
        #: about that text (prompt lookup may have nothing at all), so the drafter is asked again
        #: only once they change. (A secondary's stream does not lengthen the pending drafts: asked
        #: again at once, it would repeat itself, without end for a drafter that takes no time.)
        self._idle_at: tuple[int, int] | None = None
        #: The pending read of the next chunk: what the DSI loop waits on.
        self.reader: asyncio.Task[DraftChunk] | None = None
        #: Loop time by which the reader must have its chunk (see :meth:`check_deadline`).
        self.read_by = 0.0
        self._chunk_at = 0.0  # when the stream's previous chunk came (0: none yet)
        self._started_at = 0.0  # when the stream started
        self._asked = 0  # tokens the running stream was asked for
        self._received = 0  # tokens its chunks carried so far

    @property
    def max_lead(self) -> int:
        """How far ahead of the committed sequence drafting may run."""
        gen = self.gen
        return gen.lookahead * (gen.sp_degree + gen.engine.lead_chunks)

    def ensure(self) -> None:
        """Start a stream if none runs, more drafts can come, and drafting is
        not yet ``max_lead`` tokens ahead."""
        gen = self.gen
        if self._stream is not None or gen.finished or self.slot.stats.dropped or not more_drafts_coming(gen):
            return
        if self._idle_at == (len(gen.committed), len(gen.pending)):
            return  # it had nothing more to propose for this text
        if not gen.reattach(self.slot):
            return  # its drafter failed and none of its model is in service yet
        room = self.max_lead - len(gen.pending)
        if room < gen.lookahead:
            return  # far enough ahead; resume when verifications catch up
        end = len(gen.committed) + len(gen.pending)
        self._idle_at = None
        self._chunk_at = 0.0
        self._started_at = clock()
        self._asked = min(room, gen.last_pos + 1 - end)
        self._received = 0
        request = gen.draft_request(gen.context(end), self._asked, primary=self.slot.primary)
        client = self.slot.client
        assert client is not None
        self._stream = client.draft(request)
        self._tree = StreamTree(end)
        if not self.slot.primary:
            self._proposal = gen.proposals[self.slot.index] = Proposal(self.slot, end)
        self._read()
        gen.stats.draft_streams += 1
        self._stream_id = gen.next_stream_id()
        if gen.observer is not None:
            gen.observer.draft_stream_started(self._stream_id, client.name, end, time.perf_counter())

    def _read(self) -> None:
        assert self._stream is not None
        self.reader = asyncio.ensure_future(self._stream.__anext__())
        self.read_by = asyncio.get_running_loop().time() + self.gen.draft_timeout()

    def check_deadline(self) -> None:
        """A drafter that sends no chunk in time (stopped, partitioned) has
        failed: the generation goes on without it. A check that comes more
        than ``LATE_CHECK`` seconds after the deadline means the coordinator
        itself was held up (a garbage collection, a starved CPU: its event
        loop did not run, so neither did the reading of the chunk): the
        drafter gets its time again (a 0.6 s stall had dropped a healthy
        drafter)."""
        now = asyncio.get_running_loop().time()
        if self.reader is None or self.reader.done() or now < self.read_by:
            return
        if now - self.read_by > LATE_CHECK:
            self.read_by = now + self.gen.draft_timeout()
            return
        assert self.slot.client is not None
        why = f"no draft chunk within {self.gen.draft_timeout():.3g}s"
        self._fail(Unavailable(f"{self.slot.client.name} is unavailable: {why}"))

    def _fail(self, exc: BaseException) -> None:
        self.stop()
        self.gen.drafter_failed(self.slot, exc)

    def _ended(self, cancelled: bool) -> None:
        if self.gen.observer is not None:
            self.gen.observer.draft_stream_ended(self._stream_id, time.perf_counter(), cancelled)

    def stop(self) -> None:
        """Cancel the stream (stale after a rejection, or the generation ends)."""
        stream, reader = self._stream, self.reader
        self._stream = self.reader = None
        if stream is None:
            return
        self._ended(cancelled=True)
        self.gen.close_stream(stream, reader)

    def stop_if_stale(self) -> None:
        """A secondary drafter's stream whose proposal went wrong (or was
        dropped with its generation's speculation) is of no more use."""
        p = self._proposal
        if self._stream is not None and p is not None and (p.dead or self.gen.proposals.get(self.slot.index) is not p):
            self.stop()

    def on_chunk(self) -> None:
        """Take the chunk the reader got."""
        reader, gen = self.reader, self.gen
        assert reader is not None and reader.done()
        if reader.cancelled():
            return
        exc = reader.exception()
        if isinstance(exc, StopAsyncIteration):
            self._stream = self.reader = None
            self._ended(cancelled=False)
            # A primary stream that gave all it was asked for lengthened the pending drafts: it is
            # restarted as soon as there is room. One that gave less had no more to say, and a
            # secondary's never lengthens them: asked again only once the text changes.
            if not self.slot.primary or self._received < self._asked:
                self._idle_at = (len(gen.committed), len(gen.pending))
            return
        if exc is not None:
            self._fail(exc)
            return
        chunk = reader.result()
        gen.stats.drafted_tokens += len(chunk.tokens)
        self._received += len(chunk.tokens)
        now = clock()
        if self.slot.primary and gen.planner is not None:  # the first chunk includes a prefill
            first = not self._chunk_at
            since = self._started_at if first else self._chunk_at
            gen.planner.drafted(len(chunk.tokens), now - since, first, chunk.stats.compute_seconds)
        self._chunk_at = now
        if gen.observer is not None:
            info = DraftChunkInfo(self._stream_id, chunk.start_position, len(chunk.tokens), time.perf_counter())
            gen.observer.draft_chunk(info)
        read = self._extend_main(chunk) if self.slot.primary else self._extend_proposal(chunk)
        if read:
            self._read()

    def _extend_main(self, chunk: DraftChunk) -> bool:
        """Append what extends the pending drafts; a chunk built on a prefix
        that turned out differently is stale and stops the stream."""
        gen = self.gen
        c = len(gen.committed)
        for pos, token, branch in self._tree.read(chunk.tokens):
            if branch is not None:  # an alternative (or its branch, which grows in place)
                if len(branch) == 1 and c <= pos < c + len(gen.pending):
                    gen.alternatives.add(pos, branch)
                continue
            end = c + len(gen.pending)
            if pos < end:  # the frontier overtook the drafter: compare with what is known
                known = gen.committed[pos] if pos < c else gen.pending[pos - c].token_id
                if known != token:
                    self.stop()  # drafted from a stale prefix
                    return False
            elif pos == end and pos <= gen.last_pos:
                gen.pending.append(DraftToken(token))
        return True

    def _extend_proposal(self, chunk: DraftChunk) -> bool:
        p = self._proposal
        assert p is not None
        for pos, token, branch in self._tree.read(chunk.tokens):
            if branch is None and pos == p.start + len(p.tokens):
                p.tokens.append(token)
        if p.dead or self.gen.proposals.get(self.slot.index) is not p:
            self.stop()
            return False
        return True
