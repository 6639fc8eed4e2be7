"""DSI's drafting: one Draft stream that keeps the generation's pending drafts
growing while verifications run, stopped when it is far enough ahead and
restarted after a rejection."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from dsi.domain.types import DraftChunk, DraftToken
from services.coordinator.engine.generation import Generation
from services.coordinator.engine.observe import DraftChunkInfo
from services.coordinator.engine.trees import StreamTree


class DraftFeed:
    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self._stream: AsyncIterator[DraftChunk] | None = None
        self._stream_id = -1
        self._tree = StreamTree(0)
        #: The pending read of the next chunk: what the DSI loop waits on.
        self.reader: asyncio.Task[DraftChunk] | None = None

    @property
    def max_lead(self) -> int:
        """How far ahead of the committed sequence drafting may run."""
        gen = self.gen
        return gen.params.lookahead * (gen.engine.sp_degree + gen.engine.lead_chunks)

    def more_coming(self) -> bool:
        """Whether drafting has more to add: not past the last position, and
        not after a drafted end-of-sequence."""
        gen = self.gen
        end = len(gen.committed) + len(gen.pending)
        return end <= gen.last_pos and not (gen.pending and gen.pending[-1].token_id in gen.engine.eos)

    def ensure(self) -> None:
        """Start a stream if none runs, more drafts can come, and drafting is
        not yet ``max_lead`` tokens ahead."""
        gen = self.gen
        if self._stream is not None or gen.finished or not self.more_coming():
            return
        room = self.max_lead - len(gen.pending)
        if room < gen.params.lookahead:
            return  # far enough ahead; resume when verifications catch up
        end = len(gen.committed) + len(gen.pending)
        request = gen.draft_request(gen.context(end), min(room, gen.last_pos + 1 - end))
        drafter = gen.drafter()
        self._stream = drafter.draft(request)
        self._tree = StreamTree(end)
        self.reader = asyncio.ensure_future(self._stream.__anext__())
        gen.stats.draft_streams += 1
        self._stream_id = gen.next_stream_id()
        if gen.observer is not None:
            gen.observer.draft_stream_started(self._stream_id, drafter.name, end, time.perf_counter())

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

        async def close() -> None:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            with contextlib.suppress(BaseException):
                await stream.aclose()  # type: ignore[attr-defined]

        self.gen.cancelled.add(asyncio.ensure_future(close()))

    def on_chunk(self) -> None:
        """Take the chunk the reader got: append what extends the pending
        drafts; a chunk built on a prefix that turned out differently is
        stale and stops the stream."""
        reader, gen = self.reader, self.gen
        assert reader is not None and reader.done()
        if reader.cancelled():
            return
        exc = reader.exception()
        if isinstance(exc, StopAsyncIteration):
            self._stream = self.reader = None
            self._ended(cancelled=False)
            return
        if exc is not None:
            raise exc
        chunk = reader.result()
        gen.stats.drafted_tokens += len(chunk.tokens)
        if gen.observer is not None:
            info = DraftChunkInfo(self._stream_id, chunk.start_position, len(chunk.tokens), time.perf_counter())
            gen.observer.draft_chunk(info)
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
                    return
            elif pos == end and pos <= gen.last_pos:
                gen.pending.append(DraftToken(token))
        assert self._stream is not None
        self.reader = asyncio.ensure_future(self._stream.__anext__())
