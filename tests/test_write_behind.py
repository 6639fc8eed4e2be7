"""Server-streamed messages are written behind the work that makes them
(dsi.serving.write_behind): the next decode step, drafted chunk or generation
step runs while a message is written, one write in flight at a time, and
nothing is lost or left running when the call ends or is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dsi.domain.types import DraftChunk, DraftToken, ForwardStats, VerifyResult
from dsi.serving.write_behind import WriteBehind
from dsi.v1 import drafter_pb2, target_pb2
from services.drafter.service import DrafterServicer
from services.target.service import TargetServicer


class GatedWrites:
    """A call's ``write`` that finishes only when the test opens the gate; logs what happens."""

    def __init__(self, log: list[str], fail_on: object = None) -> None:
        self.log = log
        self.gate = asyncio.Event()
        self.fail_on = fail_on
        self.in_flight = 0
        self.most_in_flight = 0
        self.written: list[object] = []

    async def write(self, message: object) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.log.append(f"write {_label(message)}")
        try:
            await self.gate.wait()
            if message == self.fail_on:
                raise RuntimeError("the call ended")
            self.written.append(message)
            self.log.append(f"written {_label(message)}")
        finally:
            self.in_flight -= 1

    # what a servicer may call on its context besides write
    def set_code(self, code: object) -> None:
        self.log.append(f"status {code}")

    def set_details(self, details: str) -> None:
        pass


def _label(message: object) -> str:
    if isinstance(message, target_pb2.DecodeResponse):
        return str(message.token_id)
    if isinstance(message, drafter_pb2.DraftStreamResponse):
        message = message.chunk
    if isinstance(message, drafter_pb2.DraftResponse):
        return str(message.tokens[0].token_id)
    return str(message)


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_write_is_started_and_the_caller_goes_on_one_write_in_flight() -> None:
    log: list[str] = []
    call = GatedWrites(log)
    async with WriteBehind(call.write) as out:
        try:
            await out.write("a")
            log.append("next work")  # runs while "a" is still being written
            await _settle()
            assert sorted(log) == ["next work", "write a"]
            second = asyncio.ensure_future(out.write("b"))
            await _settle()
            assert not second.done(), "a second write must wait for the first one"
            assert "write b" not in log
        finally:
            call.gate.set()
        await second
    assert call.written == ["a", "b"], "leaving the block waits for the last write"
    assert call.most_in_flight == 1
    assert log.index("written a") < log.index("write b")


async def test_a_failed_write_is_raised_by_the_next_write_and_at_the_end() -> None:
    call = GatedWrites([], fail_on="a")
    call.gate.set()
    out = WriteBehind(call.write)
    await out.write("a")
    with pytest.raises(RuntimeError, match="the call ended"):
        await out.write("b")
    call2 = GatedWrites([], fail_on="z")
    call2.gate.set()
    with pytest.raises(RuntimeError, match="the call ended"):
        async with WriteBehind(call2.write) as out2:
            await out2.write("z")


async def test_cancelling_the_call_cancels_its_write_in_flight() -> None:
    call = GatedWrites([])

    async def handler() -> None:
        async with WriteBehind(call.write) as out:
            await out.write("a")
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(handler())
    await _settle()
    assert call.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.in_flight == 0, "the write in flight is cancelled with the call"
    assert call.written == []


async def test_an_error_of_the_work_waits_for_the_write_and_keeps_its_own_error() -> None:
    call = GatedWrites([], fail_on="a")

    async def handler() -> None:
        async with WriteBehind(call.write) as out:
            await out.write("a")
            raise ValueError("the model failed")

    task = asyncio.ensure_future(handler())
    await _settle()
    call.gate.set()
    with pytest.raises(ValueError, match="the model failed"):  # not the write's RuntimeError
        await task
    assert call.in_flight == 0


class _Steps:
    """A target whose decode steps log when they run."""

    def __init__(self, log: list[str], n: int) -> None:
        self.log = log
        self.n = n

    async def decode(self, request: object) -> AsyncIterator[VerifyResult]:
        for i in range(self.n):
            self.log.append(f"step {i}")
            await asyncio.sleep(0)
            yield VerifyResult([], 0, 100 + i, ForwardStats())


async def test_decode_runs_the_next_step_while_a_token_is_written() -> None:
    log: list[str] = []
    context = GatedWrites(log)
    servicer = TargetServicer(_Steps(log, 3))  # type: ignore[arg-type]
    request = target_pb2.DecodeRequest(start=target_pb2.VerifyRequest(session_id="s"), max_tokens=3)
    task = asyncio.ensure_future(servicer.Decode(request, context))  # type: ignore[arg-type]
    await _settle()
    context.gate.set()
    await task
    assert log.index("step 1") < log.index("written 100"), "step 1 runs while token 100 is written"
    assert [m.token_id for m in context.written] == [100, 101, 102]
    assert context.most_in_flight == 1


class _Chunks:
    """A drafter whose chunks log when they are drafted."""

    def __init__(self, log: list[str], n: int) -> None:
        self.log = log
        self.n = n

    def draft(self, request: object) -> AsyncIterator[DraftChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[DraftChunk]:
        for i in range(self.n):
            self.log.append(f"draft {i}")
            await asyncio.sleep(0)
            yield DraftChunk([DraftToken(200 + i)], i, ForwardStats(), last=i == self.n - 1)


async def test_a_draft_call_drafts_the_next_chunk_while_one_is_written() -> None:
    log: list[str] = []
    context = GatedWrites(log)
    servicer = DrafterServicer(_Chunks(log, 3))  # type: ignore[arg-type]
    request = drafter_pb2.DraftRequest(session_id="s", context_token_ids=[1], lookahead=1)
    task = asyncio.ensure_future(servicer.Draft(request, context))  # type: ignore[arg-type]
    await _settle()
    context.gate.set()
    await task
    assert log.index("draft 1") < log.index("written 200"), "chunk 1 is drafted while chunk 0 is written"
    assert [m.tokens[0].token_id for m in context.written] == [200, 201, 202]


async def test_a_draft_stream_call_drafts_the_next_chunk_while_one_is_written() -> None:
    log: list[str] = []
    context = GatedWrites(log)
    servicer = DrafterServicer(_Chunks(log, 3))  # type: ignore[arg-type]
    draft = drafter_pb2.DraftRequest(session_id="s", context_token_ids=[1], lookahead=1)

    async def requests() -> AsyncIterator[drafter_pb2.DraftStreamRequest]:
        yield drafter_pb2.DraftStreamRequest(call_id=7, draft=draft)  # then the client half-closes

    task = asyncio.ensure_future(servicer.DraftStream(requests(), context))  # type: ignore[arg-type]
    await _settle()
    context.gate.set()
    await task
    assert log.index("draft 1") < log.index("written 200"), "chunk 1 is drafted while chunk 0 is written"
    chunks = [m.chunk.tokens[0].token_id for m in context.written]  # type: ignore[attr-defined]
    assert chunks == [200, 201, 202], "in order, the last chunk (marked last) ends the call"
    assert context.most_in_flight == 1
