"""TargetService.Decode (issue 15): target-only decoding streamed token by
token, what non-SI asks of a target. The same tokens as Verify calls without
drafts (greedy and sampled), stop tokens, context prefixes, cancellation that
reaches the target, errors as statuses, the concurrency cap, Verify calls with
targets that do not serve it, and failover of a non-SI generation whose
replica stops mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import pytest

from dsi.backends import LocalTarget, load_target_model
from dsi.domain import errors
from dsi.domain.types import GREEDY, DecodeRequest, SamplingParams, VerifyRequest
from dsi.serving.gate import Policy
from dsi.serving.server import start_server
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Coordinator, GenerateInput
from services.coordinator.engine import Strategy
from services.target.service import MODEL_METHODS, TargetServicer, register_servicer
from tests.helpers import LOOPBACK, eventually, load_drafter, register_drafter, serve, served_target, target_client

T = "synthetic:vocab=300,seed=21,tpot_ms=1"
SLOW = "synthetic:vocab=300,seed=21,ttft_ms=300,tpot_ms=300"
PROMPT = list(range(1, 40))  # long enough for context prefixes
SAMPLED = SamplingParams.create(0.8, 1.0, 0)


def served(spec: str = T, decode: bool = True, policy: Policy | None = None):
    return served_target(spec, policy, decode=decode)


client = target_client


def request(sid: str, n: int, context: Sequence[int] = PROMPT, sampling: SamplingParams = GREEDY, stop=()):
    return DecodeRequest(VerifyRequest(sid, list(context), (), sampling, 7), n, frozenset(stop))


async def tokens(target: GrpcTarget, req: DecodeRequest) -> list[int]:
    return [r.next_token async for r in target.decode(req)]


async def by_verify_calls(target: GrpcTarget, sid: str, n: int, sampling: SamplingParams = GREEDY) -> list[int]:
    ctx, out = list(PROMPT), []
    for _ in range(n):
        out.append((await target.verify(VerifyRequest(sid, list(ctx), (), sampling, 7))).next_token)
        ctx.append(out[-1])
    return out


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_decode_streams_the_tokens_that_verify_calls_without_drafts_give(sampling: SamplingParams):
    async with served() as (local, servicer, srv), client(srv.address) as c:
        assert c.decodes_streamed
        reference = await by_verify_calls(c, "v", 30, sampling)
        requests = local.counters.requests
        assert await tokens(c, request("d", 30, sampling=sampling)) == reference
        assert servicer.decodes == 1 and servicer.unary_verifications + servicer.stream_verifications == 30
        assert local.counters.requests == requests + 30, "one forward pass per token"


async def test_decode_stops_after_a_stop_token_and_after_max_tokens():
    async with served() as (_, _, srv), client(srv.address) as c:
        full = await tokens(c, request("a", 30))
        assert len(full) == 30
        stop = full[12]
        first = full.index(stop)
        stopped = await tokens(c, request("b", 30, stop={stop}))
        assert stopped == full[: first + 1], "the stop token is sent, then it ends"
        assert await tokens(c, request("c", 5)) == full[:5]


async def test_decode_sends_only_the_context_past_the_sessions_prefix_and_all_of_it_when_it_is_gone():
    async with served() as (local, servicer, srv), client(srv.address) as c:
        reference = await by_verify_calls(c, "ref", 12)
        await c.verify(VerifyRequest("p", list(PROMPT), (), GREEDY, 7))  # the session holds the prompt now
        sent = c.prefix_requests
        assert await tokens(c, request("p", 12)) == reference
        assert c.prefix_requests == sent + 1 and c.prefix_misses == 0
        await c.verify(VerifyRequest("q", list(PROMPT), (), GREEDY, 7))
        local.sessions.release("q")  # evicted on the target: the prefix is refused, the full context goes
        assert await tokens(c, request("q", 12)) == reference
        assert c.prefix_requests == sent + 2 and c.prefix_misses == 1
        assert await tokens(c, request("q", 12)) == reference, "after a decode, the next call sends a prefix"
        assert c.prefix_requests == sent + 3 and c.prefix_misses == 1
        assert servicer.decodes == 4


async def test_after_a_decode_the_next_verify_sends_only_what_the_steps_did_not_hold():
    """The session holds the context of the last step that answered, whether
    the decode ran to its end or was closed early."""
    async with served() as (local, _, srv), client(srv.address) as c:
        reference = await by_verify_calls(c, "ref", 13)
        assert await tokens(c, request("a", 12)) == reference[:12]
        sent = c.prefix_requests
        after = await c.verify(VerifyRequest("a", [*PROMPT, *reference[:12]], (), GREEDY, 7))
        assert after.next_token == reference[12]
        assert c.prefix_requests == sent + 1 and c.prefix_misses == 0
        assert after.stats.cached_tokens >= len(PROMPT) + 11, "the decoded steps' tokens were not sent again"
        steps = c.decode(request("b", 12))
        early = [(await anext(steps)).next_token for _ in range(4)]
        await steps.aclose()  # type: ignore[attr-defined]
        await eventually(lambda: local.sessions.busy == 0, timeout=10)
        after = await c.verify(VerifyRequest("b", [*PROMPT, *early], (), GREEDY, 7))
        assert after.next_token == reference[4]
        assert c.prefix_requests == sent + 2 and c.prefix_misses == 0


async def test_closing_a_decode_cancels_it_on_the_target_and_frees_the_session():
    async with served(SLOW) as (local, _, srv), client(srv.address) as c:
        steps = c.decode(request("x", 50))
        assert isinstance((await anext(steps)).next_token, int)
        await eventually(lambda: local.sessions.busy == 1, timeout=10)  # the second step is running
        await steps.aclose()
        await eventually(lambda: local.counters.cancelled_requests == 1 and local.sessions.busy == 0, timeout=10)
        done = local.counters.requests
        await asyncio.sleep(0.7)  # two more steps' time: none is computed
        assert local.counters.requests == done and local.sessions.busy == 0


async def test_bad_decode_requests_end_with_invalid_argument():
    async with served() as (_, _, srv), grpc.aio.insecure_channel(srv.address) as ch:
        stub = target_pb2_grpc.TargetServiceStub(ch)
        start = target_pb2.VerifyRequest(session_id="e", context_token_ids=[1, 2])
        cases = {
            "max_tokens must be >= 1": target_pb2.DecodeRequest(start=start, max_tokens=0),
            "must have no draft tokens": target_pb2.DecodeRequest(
                start=target_pb2.VerifyRequest(session_id="e", context_token_ids=[1], draft_tokens=[{"token_id": 3}]),
                max_tokens=2,
            ),
            "outside the vocabulary": target_pb2.DecodeRequest(
                start=target_pb2.VerifyRequest(session_id="e", context_token_ids=[1, 5000]), max_tokens=2
            ),
        }
        for message, body in cases.items():
            call = stub.Decode(body, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in info.value.details()


async def test_the_concurrency_cap_counts_decodes():
    policy = Policy(max_concurrent=1, limited=frozenset(MODEL_METHODS))
    async with served(SLOW, policy=policy) as (local, _, srv), client(srv.address) as c:
        steps = c.decode(request("r", 3))
        first = asyncio.ensure_future(anext(steps))
        await eventually(lambda: local.sessions.busy == 1, timeout=10)
        with pytest.raises(errors.ResourceExhausted, match="limit of 1 concurrent requests"):
            await tokens(c, request("s", 3))
        await first
        assert len([r async for r in steps]) == 2


async def test_a_target_without_decode_gets_verify_calls():
    async with served(decode=False) as (_, servicer, srv), client(srv.address) as c:
        assert not (await c.info()).limits.accepts_decode and not c.decodes_streamed
        assert len(await tokens(c, request("u", 6))) == 6
        assert servicer.decodes == 0 and servicer.stream_verifications == 6
        async with grpc.aio.insecure_channel(srv.address) as ch:
            body = target_pb2.DecodeRequest(
                start=target_pb2.VerifyRequest(session_id="u", context_token_ids=[1]), max_tokens=1
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in target_pb2_grpc.TargetServiceStub(ch).Decode(body, timeout=10):
                    pass
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INTERNAL, errors.Unavailable),  # e.g. "Internal error from Core": the peer went away
        (grpc.StatusCode.UNKNOWN, errors.Unavailable),
        (grpc.StatusCode.CANCELLED, errors.Unavailable),  # cancelled by a stopping server
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),  # a prefix miss: resent in full
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ],
)
async def test_a_server_stream_that_fails_says_why_as_the_domain_error(code, expected) -> None:
    """Decode and Draft streams alike: a peer that went away mid-stream is Unavailable (failover)."""
    from dsi.wire.transport import server_stream

    class Call:
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="why")

        def cancel(self) -> None:
            self.cancelled = True

    call = Call()
    with pytest.raises(expected, match="why"):
        async for _ in server_stream(call, lambda m: m, "peer p"):
            pass
    assert call.cancelled


# --- through the coordinator ----------------------------------------------------------------------


@asynccontextmanager
async def cluster(
    spec: str, replicas: int, drafter: str = "", **client_kw
) -> AsyncIterator[tuple[Coordinator, list, list]]:
    async with AsyncExitStack() as stack:
        servicers, servers, t_clients, d_clients = [], [], [], []
        for _ in range(replicas):
            servicer = TargetServicer(LocalTarget(load_target_model(spec)))
            srv = await start_server(register_servicer(servicer), LOOPBACK, 0)
            stack.push_async_callback(srv.stop, 0)
            servicers.append(servicer)
            servers.append(srv)
            t_clients.append((srv.address, GrpcTarget(srv.address, **client_kw)))
        if drafter:
            srv = await stack.enter_async_context(serve(register_drafter(load_drafter(drafter))))
            d_clients.append((srv.address, GrpcDrafter(srv.address)))
        coordinator = await Coordinator.connect(t_clients, d_clients, timeout=10.0)
        stack.push_async_callback(coordinator.close)
        yield coordinator, servicers, servers


async def generate(
    coordinator: Coordinator,
    n: int,
    temperature: float = 0.0,
    on_token=None,
    strategy: Strategy = Strategy.NONSI,
    lookahead: int = 1,
) -> list[int]:
    ids: list[int] = []
    request = GenerateInput(
        prompt_token_ids=[5, 6, 7],
        max_new_tokens=n,
        seed=1,
        strategy=strategy,
        temperature=temperature,
        lookahead=lookahead,
    )
    async for out in coordinator.generate(request):
        ids.extend(out.token_ids)
        if on_token is not None:
            await on_token(len(ids))
    return ids


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
async def test_non_si_decodes_on_the_target_with_the_tokens_of_verify_calls(temperature: float):
    async with cluster(T, 1, verify_stream=False) as (coordinator, servicers, _):
        reference = await generate(coordinator, 40, temperature)
        assert servicers[0].decodes == 0 and servicers[0].unary_verifications == 40
    async with cluster(T, 1) as (coordinator, servicers, _):
        assert await generate(coordinator, 40, temperature) == reference
        assert servicers[0].decodes == 1
        assert servicers[0].unary_verifications == servicers[0].stream_verifications == 0


async def test_a_non_si_generation_whose_replica_stops_mid_stream_goes_on_elsewhere():
    spec = "synthetic:vocab=300,seed=21,tpot_ms=20"
    async with cluster(spec, 1, verify_stream=False) as (coordinator, _, _):
        reference = await generate(coordinator, 40)
    async with cluster(spec, 2) as (coordinator, servicers, servers):

        async def stop_the_decoding_replica(n: int) -> None:
            if n == 10:
                (busy,) = [s for s, sv in zip(servers, servicers, strict=True) if sv.decodes]
                await busy.stop(0)

        assert await generate(coordinator, 40, on_token=stop_the_decoding_replica) == reference
        assert all(s.decodes == 1 for s in servicers), "the second replica decoded the rest"


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
async def test_dsi_decodes_the_frontier_while_every_draft_is_wrong(temperature: float):
    """Drafts that are always wrong: after one frontier step without drafts
    (a Verify), the next is a Decode stream that goes on decoding (no round
    trip per token, as non-SI), with non-SI's tokens; stopped streams are
    cancelled on the targets and every session is released."""
    spec = "synthetic:vocab=300,seed=21,tpot_ms=10"
    async with cluster(spec, 1) as (coordinator, _, _):
        reference = await generate(coordinator, 40, temperature)
    drafter = "synthetic:vocab=300,seed=21,tpot_ms=1,acceptance=0"
    async with cluster(spec, 3, drafter) as (coordinator, servicers, _):
        assert await generate(coordinator, 40, temperature, strategy=Strategy.DSI) == reference
        decodes = sum(s.decodes for s in servicers)
        assert 1 <= decodes <= 8, f"{decodes} Decode streams for 40 tokens: one per frontier step, not a stream"
        await eventually(lambda: all(len(s.target.sessions) == 0 for s in servicers))
