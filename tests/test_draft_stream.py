"""DrafterService.DraftStream (issue 15): many draft calls on one stream per
coordinator-drafter pair. The same chunks, errors, cancellations, limits and
failures as Draft calls; Draft calls with drafters that do not serve it and
with call interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import pytest

from dsi.backends import LocalDrafter, NgramDrafter, load_drafter_model
from dsi.domain import errors
from dsi.domain.types import GREEDY, DraftRequest, TreeShape
from dsi.serving.gate import Policy
from dsi.serving.server import start_server
from dsi.tools.experiments import netdelay
from dsi.v1 import drafter_pb2, drafter_pb2_grpc
from dsi.wire.transport import GrpcDrafter
from services.coordinator.coordinator import Coordinator
from services.coordinator.engine import Strategy
from services.drafter.service import MODEL_METHODS, DrafterServicer, register_servicer
from tests.helpers import LOOPBACK, drafter_client, eventually, generate_40, served_drafter, target_servers
from tests.procs import until

D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.7"
SLOW = "synthetic:vocab=300,seed=21,ttft_ms=20,tpot_ms=20,acceptance=0.7"
T = "synthetic:vocab=300,seed=21,tpot_ms=1"


def served(spec: str = D, draft_stream: bool = True, policy: Policy | None = None):
    return served_drafter(spec, policy, draft_stream=draft_stream)


client = drafter_client


def req(sid: str, lookahead: int = 3, max_tokens: int = 9, context: tuple[int, ...] = (1, 2, 3)) -> DraftRequest:
    return DraftRequest(sid, list(context), lookahead, max_tokens, GREEDY, seed=1)


async def drafts(c: GrpcDrafter, request: DraftRequest) -> list[tuple[int, list[int]]]:
    return [(ch.start_position, [t.token_id for t in ch.tokens]) async for ch in c.draft(request)]


# --- the wire ---------------------------------------------------------------------------------


async def test_draft_calls_go_over_one_stream_with_the_same_chunks_as_draft_calls():
    async with served() as (local, servicer, srv):
        async with client(srv.address) as streamed, client(srv.address, draft_stream=False) as unary:
            assert streamed.stream is not None and unary.stream is None
            by_stream = [await drafts(streamed, req(f"a{i}", context=(1, 2, i + 3))) for i in range(5)]
            assert servicer.stream_drafts == 5 and servicer.unary_drafts == 0
            assert streamed.stream_calls == 5 and streamed.stream.opened == 1, "one stream for every call"
            by_unary = [await drafts(unary, req(f"b{i}", context=(1, 2, i + 3))) for i in range(5)]
            assert servicer.unary_drafts == 5 and unary.stream_calls == 0
            assert by_stream == by_unary
            assert [p for p, _ in by_stream[0]] == [3, 6, 9] and all(len(t) == 3 for _, t in by_stream[0])
        assert local.counters.requests == 10 and local.counters.cancelled_requests == 0


async def test_draft_calls_on_one_stream_run_concurrently():
    async with served(SLOW) as (local, servicer, srv), client(srv.address) as c:
        tasks = [asyncio.ensure_future(drafts(c, req(f"s{i}", 2, 0, (1, 2, i + 3)))) for i in range(4)]
        await eventually(lambda: local.active_streams == 4, timeout=10)  # all four drafting at once
        assert servicer.stream_drafts == 4 and c.stream is not None and c.stream.opened == 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await eventually(lambda: local.counters.cancelled_requests == 4 and local.active_streams == 0, timeout=10)


async def test_errors_come_back_with_the_status_and_message_of_a_draft_call():
    async with served() as (_, servicer, srv):
        async with client(srv.address) as streamed, client(srv.address, draft_stream=False) as unary:
            bad = req("e", context=(1, 2, 99_999))
            caught = []
            for c in (streamed, unary):
                with pytest.raises(errors.InvalidArgument) as err:
                    await drafts(c, bad)
                caught.append(str(err.value))
            assert caught[0] == caught[1] and "99999" in caught[0]
            assert servicer.stream_drafts == 1 and servicer.unary_drafts == 1
            assert await drafts(streamed, req("e")), "the stream survives an error"
            assert streamed.stream is not None and streamed.stream.opened == 1


async def test_raw_stream_sends_chunks_then_the_end_by_call_id_and_ignores_unknown_cancels():
    async with served() as (_, _, srv), grpc.aio.insecure_channel(srv.address) as ch:
        call = drafter_pb2_grpc.DrafterServiceStub(ch).DraftStream(timeout=20)
        await call.write(drafter_pb2.DraftStreamRequest(call_id=77, cancel=drafter_pb2.DraftStreamCancel()))
        ok = drafter_pb2.DraftRequest(session_id="r", context_token_ids=[1, 2], lookahead=2, max_tokens=4)
        await call.write(drafter_pb2.DraftStreamRequest(call_id=5, draft=ok))
        await call.write(drafter_pb2.DraftStreamRequest(call_id=6, draft=drafter_pb2.DraftRequest(session_id="r")))
        await call.write(drafter_pb2.DraftStreamRequest(call_id=7))  # neither draft nor cancel
        await call.done_writing()
        messages = [m async for m in call]
        assert {m.call_id for m in messages} == {5, 6, 7}
        five = [m for m in messages if m.call_id == 5]
        assert [m.WhichOneof("outcome") for m in five] == ["chunk", "chunk"], "the last chunk ends the call"
        assert [m.chunk.last for m in five] == [False, True]
        (six,) = [m for m in messages if m.call_id == 6]
        assert six.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "lookahead" in six.error.message
        (seven,) = [m for m in messages if m.call_id == 7]
        assert (
            seven.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "draft or cancel" in seven.error.message
        )
        assert await call.code() == grpc.StatusCode.OK


async def test_a_call_whose_last_chunk_is_not_marked_ends_with_an_end_message():
    """Prompt lookup that finds nothing streams no chunk at all: the call ends with `end`."""
    servicer = DrafterServicer(NgramDrafter("ngram:n=3,k=4"))
    running = await start_server(register_servicer(servicer), LOOPBACK, 0)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            call = drafter_pb2_grpc.DrafterServiceStub(ch).DraftStream(timeout=20)
            body = drafter_pb2.DraftRequest(session_id="n", context_token_ids=[1, 2, 3, 4], lookahead=2)
            await call.write(drafter_pb2.DraftStreamRequest(call_id=3, draft=body))
            repeated = drafter_pb2.DraftRequest(session_id="n", context_token_ids=[1, 2, 3, 9, 1, 2], lookahead=2)
            await call.write(drafter_pb2.DraftStreamRequest(call_id=4, draft=repeated))
            await call.done_writing()
            messages = [m async for m in call]
        assert [m.WhichOneof("outcome") for m in messages if m.call_id == 3] == ["end"]
        four = [m for m in messages if m.call_id == 4]  # proposes 3, 9, 1, 2 in two chunks, the second last
        assert [[t.token_id for t in m.chunk.tokens] for m in four] == [[3, 9], [1, 2]]
        assert [m.chunk.last for m in four] == [False, True]
    finally:
        await running.stop(0)


async def test_the_drafter_marks_only_a_streams_last_chunk_last():
    local = LocalDrafter(load_drafter_model(D))
    chain = [c.last async for c in local.draft(req("m", 3, 8))]
    assert chain == [False, False, True], "8 drafts in chunks of 3: the third is the last"
    tree = [c async for c in local.draft(DraftRequest("t", [1, 2, 3], 2, 4, GREEDY, 1, TreeShape(2, 2)))]
    assert [c.last for c in tree] == [False] * (len(tree) - 1) + [True] and len(tree) == 4  # main, branches x 2
    unlimited = local.draft(req("u", 2, 0))
    assert not any([(await anext(unlimited)).last for _ in range(5)])
    await unlimited.aclose()  # type: ignore[attr-defined]


# --- cancellation ---------------------------------------------------------------------------


async def test_closing_a_draft_call_early_stops_drafting_on_the_drafter_and_frees_its_session():
    async with served(SLOW) as (local, servicer, srv), client(srv.address) as c:
        stream = c.draft(req("c", 2, 0))  # no limit: drafts until cancelled
        first = await anext(stream)
        assert len(first.tokens) == 2 and local.sessions.is_busy("c")
        at_close = local.counters.drafted_tokens
        await stream.aclose()  # type: ignore[attr-defined]
        await eventually(lambda: local.active_streams == 0 and not local.sessions.is_busy("c"), timeout=5)
        stopped = local.counters.drafted_tokens
        assert stopped - at_close <= 3, (at_close, stopped)  # within a step or so of the cancel
        await asyncio.sleep(0.2)  # ten token steps later nothing more was drafted
        assert local.counters.drafted_tokens == stopped and local.counters.cancelled_requests == 1
        assert c.stream is not None and not c.stream._stream.pending  # type: ignore[union-attr]
        # the stream goes on: the next call on it drafts from the kept session
        chunks = [ch async for ch in c.draft(req("c", 1, 2))]
        assert chunks[0].stats.cached_tokens > 0 and c.stream.opened == 1 and servicer.stream_drafts == 2


async def test_cancelling_the_task_reading_a_draft_call_cancels_it_on_the_drafter():
    async with served(SLOW) as (local, _, srv), client(srv.address) as c:

        async def read() -> None:
            async for _ in c.draft(req("t", 1, 0)):
                pass

        task = asyncio.ensure_future(read())
        await eventually(lambda: local.counters.drafted_tokens >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: local.counters.cancelled_requests == 1 and local.active_streams == 0, timeout=5)


async def test_cancelling_the_stream_cancels_every_call_it_carries():
    async with served(SLOW) as (local, _, srv), grpc.aio.insecure_channel(srv.address) as ch:
        call = drafter_pb2_grpc.DrafterServiceStub(ch).DraftStream(timeout=20)
        for i in range(3):
            body = drafter_pb2.DraftRequest(session_id=f"x{i}", context_token_ids=[1, 2], lookahead=1)
            await call.write(drafter_pb2.DraftStreamRequest(call_id=i + 1, draft=body))
        await eventually(lambda: local.active_streams == 3)
        call.cancel()
        await eventually(lambda: local.counters.cancelled_requests == 3 and local.active_streams == 0, timeout=10)


# --- failures ---------------------------------------------------------------------------------


async def test_a_stopped_drafter_fails_calls_unavailable_and_a_new_stream_works_after_restart():
    local = LocalDrafter(load_drafter_model(SLOW))
    running = await start_server(register_servicer(DrafterServicer(local)), LOOPBACK, 0)
    port = running.port
    c = GrpcDrafter(running.address, timeout=20)
    try:
        await c.info()
        pending = [asyncio.ensure_future(drafts(c, req(f"k{i}", 1, 0))) for i in range(2)]
        await eventually(lambda: local.active_streams == 2)
        await running.stop(0)
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            assert isinstance(outcome, errors.Unavailable), outcome
            assert f"drafter {running.address} is unavailable" in str(outcome)
        with pytest.raises(errors.Unavailable):
            await drafts(c, req("k9"))  # nobody listens: a new stream fails too
        running = await start_server(
            register_servicer(DrafterServicer(LocalDrafter(load_drafter_model(D)))), LOOPBACK, port
        )

        async def answered() -> bool:
            try:
                return len(await drafts(c, req("k"))) == 3
            except errors.Unavailable:
                return False

        await until(answered, 10, "a draft call on a new stream to the restarted drafter")
        assert c.stream is not None and c.stream.opened >= 3
    finally:
        await c.close()
        await running.stop(0)


async def test_a_drafter_shutting_down_finishes_calls_in_flight_and_ends_its_streams():
    local = LocalDrafter(load_drafter_model(SLOW))
    servicer = DrafterServicer(local)
    running = await start_server(register_servicer(servicer), LOOPBACK, 0)
    c = GrpcDrafter(running.address, timeout=20)
    try:
        await c.info()
        first = asyncio.ensure_future(drafts(c, req("g", 2, 10)))
        await eventually(lambda: local.active_streams == 1)
        stopping = asyncio.ensure_future(running.stop(grace=5.0, wind_down=servicer.wind_down))
        await eventually(lambda: servicer.streams.draining)
        with pytest.raises(errors.Unavailable, match="this drafter is shutting down"):
            await drafts(c, req("late"))
        assert [len(t) for _, t in await first] == [2] * 5, "the call in flight ran to its end"
        await asyncio.wait_for(stopping, 5.0)  # the streams ended: no wait for the grace's end
        assert local.counters.cancelled_requests == 0
    finally:
        await c.close()
        await running.stop(0)


# --- fallbacks, limits -------------------------------------------------------------------------


async def test_a_drafter_without_the_stream_gets_draft_calls():
    async with served(draft_stream=False) as (_, servicer, srv), client(srv.address) as c:
        assert not (await c.info()).limits.accepts_draft_stream and c.stream is None
        await drafts(c, req("u"))
        assert servicer.unary_drafts == 1 and servicer.stream_drafts == 0 and c.stream_calls == 0


async def test_call_interceptors_and_the_switch_keep_draft_calls(monkeypatch: pytest.MonkeyPatch):
    async with served() as (_, servicer, srv):
        async with client(srv.address, interceptors=netdelay.interceptors(1.0)) as delayed:
            assert delayed.stream is None, "injected delay acts per call: the stream would bypass it"
            await drafts(delayed, req("n"))
        monkeypatch.setenv("DSI_VERIFY_STREAM", "0")
        async with client(srv.address) as switched_off:
            assert switched_off.stream is None
            await drafts(switched_off, req("o"))
        assert servicer.unary_drafts == 2 and servicer.stream_drafts == 0


async def test_the_concurrency_cap_counts_each_call_on_a_stream():
    policy = Policy(max_concurrent=2, limited=frozenset(MODEL_METHODS))
    async with served(SLOW, policy=policy) as (local, _, srv), client(srv.address) as c:
        busy = [asyncio.ensure_future(drafts(c, req(f"q{i}", 1, 4))) for i in range(2)]
        await eventually(lambda: local.active_streams == 2)
        with pytest.raises(errors.ResourceExhausted, match="limit of 2 concurrent requests"):
            await drafts(c, req("q2"))
        assert all(len(r) == 4 for r in await asyncio.gather(*busy))
        # slots come back when calls end, closed ones included
        closed = c.draft(req("q3", 1, 0))
        await anext(closed)
        await closed.aclose()  # type: ignore[attr-defined]
        await eventually(lambda: local.active_streams == 0, timeout=10)
        assert all(len(r) == 3 for r in await asyncio.gather(*(drafts(c, req(f"r{i}")) for i in range(2))))


# --- through the coordinator ----------------------------------------------------------------------


@asynccontextmanager
async def cluster(draft_stream: bool) -> AsyncIterator[tuple[Coordinator, DrafterServicer]]:
    async with AsyncExitStack() as stack:
        t_clients = await target_servers(stack, T)
        servicer = DrafterServicer(LocalDrafter(load_drafter_model(D)))
        dsrv = await start_server(register_servicer(servicer), LOOPBACK, 0)
        stack.push_async_callback(dsrv.stop, 0)
        d_clients = [(dsrv.address, GrpcDrafter(dsrv.address, draft_stream=draft_stream))]
        coordinator = await Coordinator.connect(t_clients, d_clients, timeout=10.0)
        stack.push_async_callback(coordinator.close)
        yield coordinator, servicer


async def test_si_and_dsi_give_the_same_tokens_over_the_stream_as_over_draft_calls():
    async with cluster(draft_stream=False) as (coordinator, servicer):
        reference = await generate_40(coordinator, Strategy.NONSI)
        assert await generate_40(coordinator, Strategy.SI) == reference
        assert servicer.stream_drafts == 0 and servicer.unary_drafts > 0
    assert len(reference) == 40
    async with cluster(draft_stream=True) as (coordinator, servicer):
        for strategy in (Strategy.SI, Strategy.DSI):
            assert await generate_40(coordinator, strategy) == reference, strategy
        assert servicer.unary_drafts == 0 and servicer.stream_drafts > 0, "a draft went as a Draft call"
        (member,) = [slot.member for slot in coordinator.engine.drafters.slots]
        assert member.stream is not None and member.stream.opened == 1
