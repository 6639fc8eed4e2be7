"""TargetService.VerifyStream (issue 15): many verifications on one stream per
coordinator-replica pair. The same tokens, errors, cancellations, limits and
failover as unary Verify calls; unary Verify with targets that do not serve it
and with call interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest

from dsi.backends import BatchLimits, LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain import errors
from dsi.domain.types import GREEDY, VerifyRequest, VerifyResult
from dsi.serving.gate import Policy
from dsi.serving.server import start_server
from dsi.tools.experiments import netdelay
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire.security import ClientSecurity, ServerSecurity
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Coordinator
from services.coordinator.engine import Strategy
from services.drafter.service import register as register_drafter
from services.target.service import MODEL_METHODS, TargetServicer, register_servicer
from tests.helpers import LOOPBACK, eventually, generate_40, informed, served_target, target_client
from tests.procs import until

T = "synthetic:vocab=300,seed=21,tpot_ms=1"
SLOW = "synthetic:vocab=300,seed=21,ttft_ms=400,tpot_ms=400"
D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.7"
TOKEN = "stream-s3cret_token"


def served(spec: str = T, verify_stream: bool = True, policy: Policy | None = None):
    return served_target(spec, policy, verify_stream=verify_stream)


client = target_client


def req(sid: str, context: Sequence[int], drafts: int = 0) -> VerifyRequest:
    from dsi.domain.types import DraftToken

    return VerifyRequest(sid, list(context), [DraftToken(7)] * drafts, GREEDY, 1)


async def decode(target: GrpcTarget, sid: str, steps: int) -> list[int]:
    ctx = list(range(1, 40))  # long enough for context prefixes
    for _ in range(steps):
        ctx.append((await target.verify(req(sid, ctx))).next_token)
    return ctx


# --- the wire ---------------------------------------------------------------------------------


async def test_verifications_go_over_one_stream_with_the_same_results_as_unary_calls():
    async with served() as (local, servicer, srv):
        async with client(srv.address) as streamed, client(srv.address, verify_stream=False) as unary:
            assert streamed.stream is not None and unary.stream is None
            by_stream = await decode(streamed, "a", 30)
            assert servicer.stream_verifications == 30 and servicer.unary_verifications == 0
            assert streamed.stream_calls == 30 and streamed.stream.opened == 1, "one stream for every call"
            assert streamed.prefix_requests > 0, "context prefixes work over the stream"
            by_unary = await decode(unary, "b", 30)
            assert servicer.unary_verifications == 30 and unary.stream_calls == 0
            assert by_stream == by_unary
        assert local.counters.requests == 60


async def test_concurrent_verifications_on_one_stream_run_concurrently():
    """A target that batches runs the waiting requests of one stream in one pass,
    as it does with separate calls: they were in flight at once."""
    local = LocalTarget(load_target_model("synthetic:vocab=300,seed=21,tpot_ms=20"), batch=BatchLimits(max_batch=8))
    servicer = TargetServicer(local)
    running = await start_server(register_servicer(servicer), LOOPBACK, 0)
    device_free = asyncio.Event()
    busy = asyncio.ensure_future(local.device.exclusive(device_free.wait))  # the device is busy until we say
    try:
        async with client(running.address) as c:
            calls = asyncio.gather(*(c.verify(req(f"s{i}", [1, 2, i + 3])) for i in range(6)))
            await eventually(lambda: local.device.waiting == 6, timeout=10)  # all six in flight at once
            device_free.set()
            results = await calls
            assert all(isinstance(r, VerifyResult) for r in results)
            assert c.stream_calls == 6 and servicer.unary_verifications == 0
            assert local.device.stats.passes == 2 and local.device.stats.largest_batch == 6  # the wait, then one pass
    finally:
        device_free.set()
        await busy
        await running.stop(0)


async def test_a_half_closed_stream_ends_only_after_every_answer_is_written():
    """The client half-closes while a call's answer is still being written
    (the call is no longer cancellable then): the stream must not end, and
    drop that answer, before it is written (a CI flake)."""
    local = LocalTarget(load_target_model(T))
    servicer = TargetServicer(local)
    writing, finish_writing = asyncio.Event(), asyncio.Event()
    written: list[int] = []

    class Context:
        async def write(self, response: target_pb2.VerifyStreamResponse) -> None:
            writing.set()
            await finish_writing.wait()
            written.append(response.call_id)

    async def requests() -> AsyncIterator[target_pb2.VerifyStreamRequest]:
        ok = target_pb2.VerifyRequest(session_id="w", context_token_ids=[1, 2])
        yield target_pb2.VerifyStreamRequest(call_id=5, verify=ok)
        await writing.wait()  # then the client half-closes

    serving = asyncio.ensure_future(servicer.VerifyStream(requests(), Context()))  # type: ignore[arg-type]
    await asyncio.wait_for(writing.wait(), 5)
    await asyncio.sleep(0.05)
    assert not serving.done(), "the stream ended with an answer still being written"
    finish_writing.set()
    await asyncio.wait_for(serving, 5)
    assert written == [5]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INTERNAL, errors.Unavailable),  # e.g. "Internal error from Core": the target went away
        (grpc.StatusCode.UNKNOWN, errors.Unavailable),
        (grpc.StatusCode.CANCELLED, errors.Unavailable),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),  # about the caller: passed on
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ],
)
def test_a_failed_stream_fails_its_calls_over_unless_the_caller_is_at_fault(code, expected) -> None:
    from dsi.wire.call_stream import _stream_error

    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
    assert type(_stream_error(exc, "target t")) is expected


async def test_errors_come_back_with_the_status_and_message_of_a_unary_call():
    async with served() as (_, servicer, srv):
        async with client(srv.address) as streamed, client(srv.address, verify_stream=False) as unary:
            bad = req("e", [1, 2, 99_999])
            caught = []
            for c in (streamed, unary):
                with pytest.raises(errors.InvalidArgument) as err:
                    await c.verify(bad)
                caught.append(str(err.value))
            assert caught[0] == caught[1] and "99999" in caught[0]
            assert servicer.stream_verifications == 1 and servicer.unary_verifications == 1
            assert (await streamed.verify(req("e", [1, 2]))).next_token >= 0, "the stream survives an error"
            assert streamed.stream is not None and streamed.stream.opened == 1


async def test_raw_stream_answers_by_call_id_and_ignores_unknown_cancels():
    async with served() as (_, _, srv), grpc.aio.insecure_channel(srv.address) as ch:
        call = target_pb2_grpc.TargetServiceStub(ch).VerifyStream(timeout=20)
        await call.write(target_pb2.VerifyStreamRequest(call_id=77, cancel=target_pb2.VerifyStreamCancel()))
        ok = target_pb2.VerifyRequest(session_id="r", context_token_ids=[1, 2])
        await call.write(target_pb2.VerifyStreamRequest(call_id=5, verify=ok))
        await call.write(target_pb2.VerifyStreamRequest(call_id=6, verify=target_pb2.VerifyRequest(session_id="r")))
        await call.done_writing()
        answers = {m.call_id: m async for m in call}
        assert set(answers) == {5, 6}
        assert answers[5].WhichOneof("outcome") == "result"
        assert answers[6].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "context" in answers[6].error.message
        assert await call.code() == grpc.StatusCode.OK


# --- cancellation ---------------------------------------------------------------------------


async def test_a_cancelled_verification_is_cancelled_on_the_target_and_releases_its_session():
    async with served(SLOW) as (local, _, srv), client(srv.address) as c:
        task = asyncio.ensure_future(c.verify(req("c", [1, 2, 3])))
        await eventually(lambda: local.sessions.busy == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: local.counters.cancelled_requests == 1 and local.sessions.busy == 0, timeout=10)
        assert c.stream is not None and c.stream.opened == 1
        # the stream goes on: the next call on it is answered
        assert isinstance(await c.verify(req("c2", [1, 2])), VerifyResult)
        assert local.counters.cancelled_requests == 1 and c.stream.opened == 1


async def test_a_cancel_goes_out_behind_the_call_that_replaces_the_stale_one(monkeypatch: pytest.MonkeyPatch):
    """DSI after a rejection cancels stale verifications and sends the next
    one in the same event-loop turn; the cancels go out after it (a write
    holds the loop, and only the new call is on the critical path), and
    still reach the target."""
    from dsi.wire import call_stream

    sent: list[str] = []
    send = call_stream._Stream.send

    def recorded(self, message) -> None:
        sent.append(message.WhichOneof("kind") if hasattr(message, "WhichOneof") else "close")
        send(self, message)

    monkeypatch.setattr(call_stream._Stream, "send", recorded)
    # No client-side timeout, as the coordinator's (a timeout's wait adds a turn before the cancel)
    async with served(SLOW) as (local, _, srv), informed(GrpcTarget(srv.address)) as c:
        stale = asyncio.ensure_future(c.verify(req("a", [1, 2, 3])))
        await eventually(lambda: local.sessions.busy == 1)
        sent.clear()
        stale.cancel()
        fresh = asyncio.ensure_future(c.verify(req("b", [1, 2])))
        with pytest.raises(asyncio.CancelledError):
            await stale
        await eventually(lambda: len(sent) == 2)
        assert sent == ["verify", "cancel"]
        await eventually(lambda: local.counters.cancelled_requests == 1, timeout=10)
        assert isinstance(await fresh, VerifyResult)


async def test_a_deadline_cancels_the_call_on_the_target_and_raises_unavailable():
    async with served(SLOW) as (local, _, srv):
        c = GrpcTarget(srv.address, timeout=0.2)
        try:
            await c.info()
            with pytest.raises(errors.Unavailable, match="Deadline Exceeded"):
                await c.verify(req("d", [1, 2, 3]))
            await eventually(lambda: local.counters.cancelled_requests == 1 and local.sessions.busy == 0, timeout=10)
        finally:
            await c.close()


async def test_cancelling_the_stream_cancels_every_call_it_carries():
    async with served(SLOW) as (local, _, srv), grpc.aio.insecure_channel(srv.address) as ch:
        call = target_pb2_grpc.TargetServiceStub(ch).VerifyStream(timeout=20)
        for i in range(3):
            body = target_pb2.VerifyRequest(session_id=f"x{i}", context_token_ids=[1, 2])
            await call.write(target_pb2.VerifyStreamRequest(call_id=i + 1, verify=body))
        await eventually(lambda: local.sessions.busy == 3)
        call.cancel()
        await eventually(lambda: local.counters.cancelled_requests == 3 and local.sessions.busy == 0, timeout=10)


# --- failures ---------------------------------------------------------------------------------


async def test_a_stopped_target_fails_pending_calls_unavailable_and_a_new_stream_works_after_restart():
    local = LocalTarget(load_target_model(SLOW))
    running = await start_server(register_servicer(TargetServicer(local)), LOOPBACK, 0)
    port = running.port
    c = GrpcTarget(running.address, timeout=20)
    try:
        await c.info()
        pending = [asyncio.ensure_future(c.verify(req(f"k{i}", [1, 2]))) for i in range(2)]
        await eventually(lambda: local.sessions.busy == 2)
        await running.stop(0)
        for outcome in await asyncio.gather(*pending, return_exceptions=True):
            assert isinstance(outcome, errors.Unavailable), outcome
            assert f"target {running.address} is unavailable" in str(outcome)
        with pytest.raises(errors.Unavailable):
            await c.verify(req("k9", [1, 2]))  # nobody listens: a new stream fails too
        again = LocalTarget(load_target_model(T))
        running = await start_server(register_servicer(TargetServicer(again)), LOOPBACK, port)

        async def answered() -> bool:
            try:
                return isinstance(await c.verify(req("k", [1, 2])), VerifyResult)
            except errors.Unavailable:
                return False

        await until(answered, 10, "a verification on a new stream to the restarted target")
        assert c.stream is not None and c.stream.opened >= 3
    finally:
        await c.close()
        await running.stop(0)


async def test_a_target_shutting_down_finishes_calls_in_flight_and_ends_its_streams():
    local = LocalTarget(load_target_model("synthetic:vocab=300,seed=21,ttft_ms=300,tpot_ms=300"))
    servicer = TargetServicer(local)
    running = await start_server(register_servicer(servicer), LOOPBACK, 0)
    c = GrpcTarget(running.address, timeout=20)
    try:
        await c.info()
        first = asyncio.ensure_future(c.verify(req("g", [1, 2])))
        await eventually(lambda: local.sessions.busy == 1)
        stopping = asyncio.ensure_future(running.stop(grace=5.0, wind_down=servicer.wind_down))
        await eventually(lambda: servicer.streams.draining)
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await c.verify(req("late", [1, 2]))
        assert isinstance(await first, VerifyResult), "the call in flight was answered"
        await asyncio.wait_for(stopping, 5.0)  # the streams ended: no wait for the grace's end
        assert local.counters.cancelled_requests == 0
    finally:
        await c.close()
        await running.stop(0)


# --- fallbacks ----------------------------------------------------------------------------------


async def test_a_target_without_the_stream_gets_unary_calls():
    async with served(verify_stream=False) as (_, servicer, srv), client(srv.address) as c:
        info = await c.info()
        assert not info.limits.accepts_verify_stream and c.stream is None
        await decode(c, "u", 5)
        assert servicer.unary_verifications == 5 and servicer.stream_verifications == 0 and c.stream_calls == 0


async def test_call_interceptors_and_the_switch_keep_unary_calls(monkeypatch: pytest.MonkeyPatch):
    async with served() as (_, servicer, srv):
        async with client(srv.address, interceptors=netdelay.interceptors(1.0)) as delayed:
            assert delayed.stream is None, "injected delay acts per call: the stream would bypass it"
            await decode(delayed, "n", 3)
        monkeypatch.setenv("DSI_VERIFY_STREAM", "0")
        async with client(srv.address) as switched_off:
            assert switched_off.stream is None
            await decode(switched_off, "o", 3)
        assert servicer.unary_verifications == 6 and servicer.stream_verifications == 0


# --- admission and security -----------------------------------------------------------------------


async def test_the_concurrency_cap_counts_each_call_on_a_stream():
    policy = Policy(max_concurrent=2, limited=frozenset(MODEL_METHODS))
    async with served(SLOW, policy=policy) as (local, _, srv), client(srv.address) as c:
        busy = [asyncio.ensure_future(c.verify(req(f"q{i}", [1, 2]))) for i in range(2)]
        await eventually(lambda: local.sessions.busy == 2)
        with pytest.raises(errors.ResourceExhausted, match="limit of 2 concurrent requests"):
            await c.verify(req("q2", [1, 2]))
        assert all(isinstance(r, VerifyResult) for r in await asyncio.gather(*busy))
        # slots come back when calls end, cancelled ones included
        cancelled = asyncio.ensure_future(c.verify(req("q3", [1, 2])))
        await eventually(lambda: local.sessions.busy == 1)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        await eventually(lambda: local.sessions.busy == 0, timeout=10)
        assert all(
            isinstance(r, VerifyResult) for r in await asyncio.gather(*(c.verify(req(f"r{i}", [1])) for i in range(2)))
        )


async def test_a_message_over_the_size_limit_is_refused():
    async with served(policy=Policy(max_message_bytes=1024)) as (_, servicer, srv), client(srv.address) as c:
        with pytest.raises(errors.ResourceExhausted):
            await c.verify(req("big", list(range(1, 200)) * 10))  # about 4 KB
        assert servicer.stream_verifications == 0, "refused unread"
        assert isinstance(await c.verify(req("small", [1, 2])), VerifyResult), "a new stream serves the next call"


async def test_the_stream_needs_the_bearer_token(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    policy = Policy(ServerSecurity.create(token_file=token_file))
    async with served(policy=policy) as (_, servicer, srv):
        async with client(srv.address, security=ClientSecurity(token=TOKEN)) as good:
            assert good.stream is not None
            assert isinstance(await good.verify(req("t", [1, 2])), VerifyResult)
            assert servicer.stream_verifications == 1
        # No token: refused before any message is read. (With grpc.aio's client a write racing the refusal
        # can replace the server's status with INTERNAL "Internal error from Core", grpc/grpc#43486; the
        # synchronous client, in a thread, reports the server's status.)
        body = target_pb2.VerifyRequest(session_id="t", context_token_ids=[1, 2])
        refused = await asyncio.to_thread(_stream_without_token, srv.address, body)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in (refused.details() or "")
        assert servicer.stream_verifications == 1


def _stream_without_token(address: str, body: target_pb2.VerifyRequest) -> grpc.RpcError:
    """The error a VerifyStream call carrying ``body`` and no token ends with."""
    with grpc.insecure_channel(address) as ch:
        responses = target_pb2_grpc.TargetServiceStub(ch).VerifyStream(
            iter([target_pb2.VerifyStreamRequest(call_id=1, verify=body)]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
        return info.value


# --- through the coordinator ----------------------------------------------------------------------


@asynccontextmanager
async def cluster(replicas: int, verify_stream: bool) -> AsyncIterator[tuple[Coordinator, list[TargetServicer]]]:
    async with AsyncExitStack() as stack:
        servicers, t_clients, d_clients = [], [], []
        for _ in range(replicas):
            servicer = TargetServicer(LocalTarget(load_target_model(T)))
            srv = await start_server(register_servicer(servicer), LOOPBACK, 0)
            stack.push_async_callback(srv.stop, 0)
            servicers.append(servicer)
            t_clients.append((srv.address, GrpcTarget(srv.address, verify_stream=verify_stream)))
        dsrv = await start_server(register_drafter(LocalDrafter(load_drafter_model(D))), LOOPBACK, 0)
        stack.push_async_callback(dsrv.stop, 0)
        d_clients.append((dsrv.address, GrpcDrafter(dsrv.address)))
        coordinator = await Coordinator.connect(t_clients, d_clients, timeout=10.0)
        stack.push_async_callback(coordinator.close)
        yield coordinator, servicers


async def test_non_si_si_and_dsi_give_the_same_tokens_over_the_stream_as_over_unary_calls():
    async with cluster(2, verify_stream=False) as (coordinator, servicers):
        reference = await generate_40(coordinator, Strategy.NONSI)
        assert sum(s.stream_verifications for s in servicers) == 0
    assert len(reference) == 40
    async with cluster(2, verify_stream=True) as (coordinator, servicers):
        for strategy in (Strategy.NONSI, Strategy.SI, Strategy.DSI):
            assert await generate_40(coordinator, strategy) == reference, strategy
        assert sum(s.unary_verifications for s in servicers) == 0, "a verification went as a unary call"
        assert all(s.stream_verifications > 0 for s in servicers), "DSI used only one replica"
        clients = [slot.member for slot in coordinator.engine.targets.slots]
        assert all(c.stream is not None and c.stream.opened == 1 for c in clients)
