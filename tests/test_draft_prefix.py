"""Context prefixes on drafters (dsi/domain/prefix.py): a client sends a
drafter only the context past the one the session last received, the drafter
checks the prefix's hash, and a session that lost it (evicted, released, a
restarted drafter) gets FAILED_PRECONDITION and then the full context. Over
Draft calls and the DraftStream; the chunks never change."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import pytest

from dsi.backends import LocalDrafter, NgramDrafter, load_drafter_model
from dsi.domain import errors
from dsi.domain.prefix import prefix_hash
from dsi.domain.types import CHAIN, GREEDY, DraftRequest, SamplingParams, TreeShape
from dsi.serving.server import start_server
from dsi.v1 import drafter_pb2, drafter_pb2_grpc
from dsi.wire.transport import GrpcDrafter
from services.coordinator.coordinator import Coordinator, GenerateInput
from services.coordinator.engine import Strategy
from services.drafter.service import DrafterServicer, register_servicer
from tests.helpers import LOOPBACK, drafter_client, eventually, serving, target_servers
from tests.procs import until

D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.7"
SLOW = "synthetic:vocab=300,seed=21,ttft_ms=20,tpot_ms=20,acceptance=0.7"
T = "synthetic:vocab=300,seed=21,tpot_ms=1"
SAMPLED = SamplingParams(temperature=1.0)
PROMPT = list(range(1, 61))
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]

#: (start_position, [(token, parent)], last) of each chunk: what must not change
Chunks = list[tuple[int, list[tuple[int, int | None]], bool]]


def recording(local: LocalDrafter) -> list[DraftRequest]:
    """The requests ``local`` is given from now on (as its servicer converted them)."""
    seen: list[DraftRequest] = []
    inner = local.draft

    def draft(request: DraftRequest) -> AsyncIterator:
        seen.append(request)
        return inner(request)

    local.draft = draft  # type: ignore[method-assign]
    return seen


@asynccontextmanager
async def served(
    draft_stream: bool = True, spec: str = D, **local_kw
) -> AsyncIterator[tuple[LocalDrafter, GrpcDrafter, list[DraftRequest]]]:
    """A served LocalDrafter (``local_kw``: its arguments), a client that has
    asked Info and sends over the DraftStream or not, and the requests the
    drafter was given."""
    local = LocalDrafter(load_drafter_model(spec), **local_kw)
    seen = recording(local)
    async with (
        serving(register_servicer(DrafterServicer(local))) as running,
        drafter_client(running.address, draft_stream=draft_stream) as client,
    ):
        assert (client.stream is not None) == draft_stream
        yield local, client, seen


async def chunks(drafter, request: DraftRequest) -> Chunks:
    return [
        (c.start_position, [(t.token_id, t.parent) for t in c.tokens], c.last) async for c in drafter.draft(request)
    ]


def req(sid: str, context: Sequence[int], sampling: SamplingParams = GREEDY, tree: TreeShape = CHAIN) -> DraftRequest:
    return DraftRequest(sid, list(context), 3, 6, sampling, seed=5, tree=tree)


async def rounds(drafter, sid: str, n: int, sampling: SamplingParams = GREEDY, tree: TreeShape = CHAIN) -> list[Chunks]:
    """``n`` SI-like rounds of one session: each context is the last one, some
    of its drafts and a token of the target's."""
    ctx, out = list(PROMPT), []
    for i in range(n):
        got = await chunks(drafter, req(sid, ctx, sampling, tree))
        out.append(got)
        main = [tok for _, toks, _ in got for tok, parent in toks if parent is None]  # a chain's drafts
        ctx += [*main[: i % 3], (17 * i + 1) % 300]
    return out


both = pytest.mark.parametrize("draft_stream", [True, False], ids=["stream", "unary"])


@both
async def test_a_second_round_sends_only_the_new_tokens(draft_stream: bool) -> None:
    async with served(draft_stream) as (local, client, seen):
        assert client.sent is not None and (await client.info()).limits.accepts_context_prefix
        first = await chunks(client, req("s", PROMPT))
        assert seen[0].prefix_length == 0 and list(seen[0].context) == PROMPT, "nothing held yet: all of it"
        more = [first[0][1][0][0], 7]
        second = await chunks(client, req("s", [*PROMPT, *more]))
        got = seen[1]
        assert (got.prefix_length, got.prefix_hash, list(got.context)) == (60, prefix_hash(PROMPT), more)
        assert client.prefix_requests == 1 and client.prefix_misses == 0
        assert second[0][0] == 62, "positions count the whole context"
        reference = LocalDrafter(load_drafter_model(D))
        assert second == await chunks(reference, req("s", [*PROMPT, *more]))
        await eventually(lambda: local.counters.requests == 2)  # both ran to their end


@both
@pytest.mark.parametrize(
    "sampling, tree",
    [(GREEDY, CHAIN), (SAMPLED, CHAIN), (GREEDY, TreeShape(2, 2)), (SAMPLED, TreeShape(3, 1))],
    ids=["greedy", "sampled", "tree", "sampled-tree"],
)
async def test_the_chunks_are_those_of_full_contexts(draft_stream: bool, sampling: SamplingParams, tree) -> None:
    want = await rounds(LocalDrafter(load_drafter_model(D)), "r", 12, sampling, tree)
    async with served(draft_stream) as (_, client, seen):
        assert await rounds(client, "r", 12, sampling, tree) == want
        assert client.prefix_requests == 11 and client.prefix_misses == 0
        assert all(r.prefix_length >= 60 and len(r.context) <= 3 for r in seen[1:])


@both
async def test_a_session_that_lost_its_prefix_gets_the_full_context(draft_stream: bool) -> None:
    ctx = list(PROMPT)
    want = await chunks(LocalDrafter(load_drafter_model(D)), req("a", [*ctx, 1]))
    async with served(draft_stream, max_sessions=1) as (local, client, seen):

        async def idle() -> None:  # a stream's last chunk may come before its session is free
            await eventually(lambda: local.sessions.busy == 0)

        await chunks(client, req("a", ctx))
        await idle()
        await chunks(client, req("b", [5] * 40))  # evicts session a
        assert local.sessions.evicted == 1
        await idle()
        assert await chunks(client, req("a", [*ctx, 1])) == want
        assert client.prefix_misses == 1, "the drafter refused the prefix, the client resent everything"
        assert [(r.session_id, r.prefix_length) for r in seen[-2:]] == [("a", 60), ("a", 0)]
        assert await chunks(client, req("a", [*ctx, 1, 2])) != [], "held again: the next one names a prefix"
        assert client.prefix_misses == 1 and seen[-1].prefix_length == 61

        await idle()
        await local.release_session("a")  # dropped behind the client's back
        assert await chunks(client, req("a", [*ctx, 1])) == want
        assert client.prefix_misses == 2 and seen[-1].prefix_length == 0


@both
async def test_a_restarted_drafter_gets_the_full_context(draft_stream: bool) -> None:
    running = await start_server(register_servicer(DrafterServicer(LocalDrafter(load_drafter_model(D)))), LOOPBACK, 0)
    port = running.port
    client = GrpcDrafter(running.address, timeout=20, draft_stream=draft_stream)
    try:
        await client.info()
        await chunks(client, req("a", PROMPT))
        await running.stop(0)
        restarted = LocalDrafter(load_drafter_model(D))
        seen = recording(restarted)
        running = await start_server(register_servicer(DrafterServicer(restarted)), LOOPBACK, port)
        answer: list[Chunks] = []

        async def answered() -> bool:
            try:
                answer.append(await chunks(client, req("a", [*PROMPT, 1])))
                return True
            except errors.Unavailable:  # not reachable yet
                return False

        await until(answered, 10, "a draft from the restarted drafter")
        want = await chunks(LocalDrafter(load_drafter_model(D)), req("a", [*PROMPT, 1]))
        assert answer == [want] and client.prefix_misses == 1
        assert [r.prefix_length for r in seen] == [60, 0], "refused, then the full context"
    finally:
        await client.close()
        await running.stop(0)


async def test_a_wrong_prefix_is_failed_precondition_on_both_rpcs() -> None:
    local = LocalDrafter(load_drafter_model(D))
    async with serving(register_servicer(DrafterServicer(local))) as running:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            info = await stub.Info(drafter_pb2.DrafterServiceInfoRequest())
            assert info.limits.accepts_context_prefix
            ctx = list(range(1, 41))

            def body(tokens: list[int], length: int = 0, digest: int = 0) -> drafter_pb2.DraftRequest:
                return drafter_pb2.DraftRequest(
                    session_id="x",
                    context_token_ids=tokens,
                    lookahead=2,
                    max_tokens=2,
                    seed=1,
                    context_prefix_length=length,
                    context_prefix_hash=digest,
                )

            full = [m async for m in stub.Draft(body(ctx))]
            empty = [m async for m in stub.Draft(body([], 40, prefix_hash(ctx)))]  # the prefix alone
            assert [list(m.tokens) for m in empty] == [list(m.tokens) for m in full] and empty[0].start_position == 40
            assert empty[0].stats.cached_tokens > 0, "drafted from the session's cache"
            bad = [(40, prefix_hash(range(2, 42))), (45, prefix_hash(range(1, 46))), (40, 0)]
            for length, digest in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in stub.Draft(body([9], length, digest))]
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "send the full context" in (err.value.details() or "")

            call = stub.DraftStream(timeout=20)
            for i, (length, digest) in enumerate(bad):
                await call.write(drafter_pb2.DraftStreamRequest(call_id=i + 1, draft=body([9], length, digest)))
            ok = body([9], 40, prefix_hash(ctx))
            await call.write(drafter_pb2.DraftStreamRequest(call_id=9, draft=ok))
            await call.done_writing()
            messages = [m async for m in call]
            for i in range(len(bad)):
                (refused,) = [m for m in messages if m.call_id == i + 1]
                assert refused.error.code == FAILED_PRECONDITION and "prefix" in refused.error.message
            nine = [m for m in messages if m.call_id == 9]
            assert [m.WhichOneof("outcome") for m in nine] == ["chunk"] and nine[0].chunk.start_position == 41
            assert await call.code() == grpc.StatusCode.OK


async def test_the_context_limit_counts_the_prefix_and_the_tokens_after_it() -> None:
    local = LocalDrafter(load_drafter_model(f"{D},max_context=45"))
    ctx = list(range(1, 41))
    assert await chunks(local, req("y", ctx))
    digest = prefix_hash(ctx)
    fits = DraftRequest("y", [9] * 4, 1, 0, prefix_length=40, prefix_hash=digest)  # 44 + 1 to draft
    assert [p for p, _, _ in await chunks(local, fits)] == [44]
    with pytest.raises(errors.InvalidArgument, match="context of 46 tokens plus 1 token to draft exceeds"):
        await chunks(local, DraftRequest("y", [9] * 6, 1, 0, prefix_length=40, prefix_hash=prefix_hash(ctx)))


@both
async def test_no_prefix_to_a_drafter_that_does_not_announce_them(draft_stream: bool) -> None:
    async with served(draft_stream) as (local, client, seen):
        local.limits = dataclasses.replace(local.limits, accepts_context_prefix=False)
        await client.info()
        assert client.sent is None
        await rounds(client, "s", 4)
        assert client.prefix_requests == 0 and all(r.prefix_length == 0 for r in seen)


async def test_prompt_lookup_drafters_do_not_take_prefixes() -> None:
    """NgramDrafter holds no context: it does not announce prefixes, and refuses one sent anyway."""
    ngram = NgramDrafter("ngram:n=3,k=4")
    assert not (await ngram.info()).limits.accepts_context_prefix
    async with serving(register_servicer(DrafterServicer(ngram))) as running:
        async with drafter_client(running.address) as client:
            assert client.sent is None
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = drafter_pb2_grpc.DrafterServiceStub(ch)
            prefixed = drafter_pb2.DraftRequest(
                session_id="n", context_token_ids=[1], lookahead=2, context_prefix_length=40, context_prefix_hash=1
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.Draft(prefixed)]
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@both
async def test_concurrent_requests_of_a_session_name_a_prefix_all_of_them_share(draft_stream: bool) -> None:
    """A new draft stream while the last one has sent nothing yet (DSI
    restarts do this): its prefix holds whichever context the drafter took
    last, so neither is refused."""
    async with served(draft_stream, SLOW) as (_, client, seen):
        await chunks(client, req("s", PROMPT))
        first = req("s", [*PROMPT[:40], *([9] * 25)])  # diverges at 40
        second = req("s", [*PROMPT, 7])
        one = asyncio.ensure_future(chunks(client, first))
        await asyncio.sleep(0.005)  # the first reaches the drafter first
        got = await asyncio.gather(one, chunks(client, second))
        assert client.prefix_misses == 0 and client.prefix_requests == 2
        assert [r.prefix_length for r in seen] == [0, 40, 40]
        reference = LocalDrafter(load_drafter_model(D))
        for request, result in zip((first, second), got, strict=True):
            assert result == await chunks(reference, request)


@both
async def test_a_request_cancelled_before_its_first_chunk_is_not_recorded(draft_stream: bool) -> None:
    """The client cannot know whether the drafter took it: the session's
    next request names a prefix of what it knows was taken, and a drafter
    that took the cancelled one refuses it (and gets the full context)."""
    async with served(draft_stream, SLOW) as (local, client, seen):
        await chunks(client, req("s", PROMPT))
        await eventually(lambda: local.counters.requests == 1 and not local.sessions.is_busy("s"))
        cancelled = asyncio.ensure_future(chunks(client, req("s", [*PROMPT[:40], *([9] * 25)])))
        await eventually(lambda: local.sessions.is_busy("s"), interval=0.001)  # taken: what the session holds
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert client.sent is not None
        assert client.sent.split("s", [*PROMPT, 7])[0] == 60, "still the first context, and nothing in flight"
        assert await chunks(client, req("s", [*PROMPT, 7])) == await chunks(
            LocalDrafter(load_drafter_model(D)), req("s", [*PROMPT, 7])
        )
        assert client.prefix_misses == 1 and [r.prefix_length for r in seen] == [0, 40, 60, 0]


# --- through the coordinator ----------------------------------------------------------------------


@asynccontextmanager
async def cluster(draft_stream: bool, prefixes: bool) -> AsyncIterator[tuple[Coordinator, GrpcDrafter, list]]:
    async with AsyncExitStack() as stack:
        t_clients = await target_servers(stack, T)
        local = LocalDrafter(load_drafter_model(D))
        if not prefixes:
            local.limits = dataclasses.replace(local.limits, accepts_context_prefix=False)
        seen = recording(local)
        dsrv = await start_server(register_servicer(DrafterServicer(local)), LOOPBACK, 0)
        stack.push_async_callback(dsrv.stop, 0)
        drafter = GrpcDrafter(dsrv.address, draft_stream=draft_stream)
        coordinator = await Coordinator.connect(t_clients, [(dsrv.address, drafter)], timeout=10.0)
        stack.push_async_callback(coordinator.close)
        yield coordinator, drafter, seen


async def generate(coordinator: Coordinator, strategy: Strategy, temperature: float) -> list[int]:
    ids: list[int] = []
    request = GenerateInput(
        prompt_token_ids=PROMPT, max_new_tokens=40, temperature=temperature, seed=3, strategy=strategy, lookahead=3
    )
    async for out in coordinator.generate(request):
        ids.extend(out.token_ids)
    return ids


@both
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
async def test_si_and_dsi_give_the_same_tokens_with_and_without_prefixes(draft_stream: bool, temperature: float):
    async with cluster(draft_stream, prefixes=False) as (coordinator, drafter, seen):
        reference = await generate(coordinator, Strategy.NONSI, temperature)
        without = {s: await generate(coordinator, s, temperature) for s in (Strategy.SI, Strategy.DSI)}
        assert drafter.sent is None and all(r.prefix_length == 0 for r in seen)
    assert len(reference) == 40 and without == {Strategy.SI: reference, Strategy.DSI: reference}
    async with cluster(draft_stream, prefixes=True) as (coordinator, drafter, seen):
        for strategy in (Strategy.SI, Strategy.DSI):
            assert await generate(coordinator, strategy, temperature) == reference, strategy
        assert drafter.prefix_requests > 0 and drafter.prefix_misses == 0
        prefixed = [r for r in seen if r.prefix_length]
        sent, named = sum(len(r.context) for r in prefixed), sum(r.prefix_length for r in prefixed)
        assert prefixed and sent < named / 4, "mostly only the new tokens went"


async def test_the_prefix_bench_sends_prefixes_and_measures_both_ways() -> None:
    """tools/prefix_bench.py (docs/benchmarks.md section 13): its rounds with
    prefixes send one, its rounds without send none, and a prefixed request
    of a long context is a tiny part of the full one on the wire."""
    from tools.prefix_bench import block, request_bytes

    prefixed, full = request_bytes(4000, 3)
    assert prefixed < 40 and full > 7000
    async with served() as (_, client, seen):
        assert len(await block(client, "p", 200, 8, 3, prefixes=True)) == 3
        assert client.prefix_requests == 7 and all(r.prefix_length >= 200 for r in seen[1:])
        await block(client, "f", 200, 8, 3, prefixes=False)
        assert client.prefix_requests == 7 and all(r.prefix_length == 0 for r in seen[8:])
