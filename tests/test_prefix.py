"""Context prefixes (dsi/domain/prefix.py): a client sends a target only the
tokens past what the session was last sent, the target checks the prefix's
hash, and a session that lost it (evicted, released, another sequence) gets
FAILED_PRECONDITION and then the full context. Results never change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import numpy as np
import pytest

from dsi.backends import LocalTarget, load_target_model
from dsi.domain.prefix import SentSequences, common_prefix, prefix_hash
from dsi.domain.types import GREEDY, DraftToken, SamplingParams, VerifyRequest
from dsi.serving.server import start_server
from dsi.v1 import target_pb2, target_pb2_grpc
from dsi.wire.transport import GrpcTarget
from services.target.service import register as register_target

SPEC = "synthetic:vocab=1000,seed=4"


@asynccontextmanager
async def served(local: LocalTarget) -> AsyncIterator[GrpcTarget]:
    srv = await start_server(register_target(local))
    client = GrpcTarget(srv.address)
    try:
        await client.info()  # as the coordinator does on connecting: learns that prefixes are accepted
        yield client
    finally:
        await client.close()
        await srv.stop(0)


def test_common_prefix() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = rng.integers(0, 3, size=int(rng.integers(0, 40))).tolist()
        b = a[: int(rng.integers(0, len(a) + 1))] + rng.integers(0, 3, size=int(rng.integers(0, 5))).tolist()
        want = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def test_prefix_hash_is_the_documented_one() -> None:
    import hashlib
    import struct

    tokens = [0, 1, 70000, 2**32 - 1]
    digest = hashlib.blake2b(struct.pack("<4I", *tokens), digest_size=8).digest()
    assert prefix_hash(tokens) == int.from_bytes(digest, "little")
    assert prefix_hash([1, 2]) != prefix_hash([2, 1])


def test_sent_sequences_split_and_bound() -> None:
    sent = SentSequences(capacity=2)
    ctx = list(range(100))
    assert sent.split("a", ctx) == (0, 0, ctx), "nothing sent yet: the full context"
    sent.record("a", ctx[:60])
    n, h, rest = sent.split("a", ctx)
    assert (n, h, list(rest)) == (60, prefix_hash(ctx[:60]), ctx[60:])
    sent.record("a", ctx[:10])
    assert sent.split("a", ctx)[0] == 0, "a short prefix is not worth a hash"
    sent.record("a", ctx)
    sent.record("b", ctx)
    sent.record("c", ctx)
    assert sent.split("a", ctx)[0] == 0 and sent.split("c", ctx)[0] == 100, "least recently used forgotten"


async def _decode(target, sid: str, prompt: list[int], steps: int, drafts_every: int = 3) -> list[tuple]:
    """Non-SI steps with a chain of (partly wrong) drafts now and then, as the
    engine sends them; the results."""
    ctx, out = list(prompt), []
    for i in range(steps):
        drafts = [DraftToken(7), DraftToken(8)] if i % drafts_every == 0 else []
        params = GREEDY if i % 2 else SamplingParams(temperature=1.0)
        r = await target.verify(VerifyRequest(sid, list(ctx), drafts, params, seed=3))
        out.append((r.decisions, r.path, r.next_token, r.num_accepted))
        ctx += [drafts[j].token_id for j in r.path] + [r.next_token]
    return out


async def test_prefixes_are_sent_and_change_nothing() -> None:
    prompt = list(range(1, 50))
    want = await _decode(LocalTarget(load_target_model(SPEC)), "s", prompt, 30)
    local = LocalTarget(load_target_model(SPEC))
    async with served(local) as client:
        assert client.sent is not None
        got = await _decode(client, "s", prompt, 30)
        assert got == want
        assert client.prefix_requests == 29 and client.prefix_misses == 0
        assert local.counters.cached_tokens > 0


async def test_a_session_that_lost_its_prefix_gets_the_full_context() -> None:
    prompt = list(range(1, 50))
    want = await _decode(LocalTarget(load_target_model(SPEC)), "a", prompt, 12)
    local = LocalTarget(load_target_model(SPEC), max_sessions=1)
    async with served(local) as client:
        got = (await _decode(client, "a", prompt, 4))[:4]
        await _decode(client, "b", [5] * 40, 2)  # evicts session a
        assert local.sessions.evicted == 1
        ctx = list(prompt)
        for _, path, nxt, _ in got:
            ctx += [[7, 8][j] for j in path] + [nxt]
        misses = client.prefix_misses
        r = await client.verify(VerifyRequest("a", ctx, [], SamplingParams(temperature=1.0), seed=3))
        assert client.prefix_misses == misses + 1, "the target refused the prefix, the client resent everything"
        assert r.next_token == want[4][2]
        await local.release_session("a")  # dropped behind the client's back (as by a restarted replica)
        ctx.append(r.next_token)
        r = await client.verify(VerifyRequest("a", ctx, [], GREEDY, seed=3))
        assert client.prefix_misses == misses + 2
        assert r.next_token == want[5][2]


async def test_a_wrong_prefix_is_failed_precondition_on_the_wire() -> None:
    local = LocalTarget(load_target_model(SPEC))
    srv = await start_server(register_target(local))
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = target_pb2_grpc.TargetServiceStub(ch)
            info = await stub.Info(target_pb2.TargetServiceInfoRequest())
            assert info.limits.accepts_context_prefix
            await stub.Verify(target_pb2.VerifyRequest(session_id="x", context_token_ids=list(range(1, 41))))
            ok = target_pb2.VerifyRequest(
                session_id="x",
                context_token_ids=[9],
                context_prefix_length=40,
                context_prefix_hash=prefix_hash(range(1, 41)),
            )
            resp = await stub.Verify(ok)
            assert resp.stats.cached_tokens == 40, "the prefix was taken from the session"
            for length, digest in ((40, prefix_hash(range(2, 42))), (45, prefix_hash(range(1, 46)))):
                bad = target_pb2.VerifyRequest(
                    session_id="x", context_token_ids=[9], context_prefix_length=length, context_prefix_hash=digest
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Verify(bad)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await srv.stop(0)


async def test_no_prefix_to_a_target_that_does_not_accept_them() -> None:
    local = LocalTarget(load_target_model(SPEC))
    local.limits = type(local.limits)(**{**vars(local.limits), "accepts_context_prefix": False})
    async with served(local) as client:
        assert client.sent is None
        await _decode(client, "s", list(range(1, 50)), 5)
        assert client.prefix_requests == 0


def test_hashed_sequence_hashes_every_prefix_like_the_whole() -> None:
    from dsi.domain.prefix import HashedSequence

    rng = np.random.default_rng(2)
    held = HashedSequence()
    held.BLOCK = 4  # many boundaries in short sequences
    for _ in range(60):
        keep = int(rng.integers(0, len(held.tokens) + 1))
        tokens = held.tokens[:keep] + rng.integers(0, 2**32, size=int(rng.integers(0, 20))).tolist()
        held.replace(tokens, keep)
        for n in range(len(tokens) + 1):
            assert held.prefix_hash(n) == prefix_hash(tokens[:n]), (len(tokens), n)


async def test_concurrent_requests_of_a_session_name_a_prefix_all_of_them_share() -> None:
    """Two verifications of one session in flight at once (DSI does this):
    the second names a prefix that holds whichever the target takes first,
    so neither is refused."""
    import asyncio

    local = LocalTarget(load_target_model("synthetic:vocab=1000,seed=4,tpot_ms=20"))
    base = list(range(1, 61))
    async with served(local) as client:
        await client.verify(VerifyRequest("s", base, [], GREEDY, 1))
        first = VerifyRequest("s", [*base[:40], *([9] * 25)], [DraftToken(3)], GREEDY, 1)  # diverges at 40
        second = VerifyRequest("s", [*base, 7], [], GREEDY, 1)
        one = asyncio.ensure_future(client.verify(first))
        await asyncio.sleep(0.005)  # the first reaches the target first
        got = await asyncio.gather(one, client.verify(second))
        assert client.prefix_misses == 0 and client.prefix_requests == 2
        reference = LocalTarget(load_target_model("synthetic:vocab=1000,seed=4"))
        for request, result in zip((first, second), got, strict=True):
            want = await reference.verify(request)
            assert (result.decisions, result.next_token) == (want.decisions, want.next_token)


@pytest.mark.parametrize("service", ["target", "drafter"])
async def test_a_prefix_of_an_unknown_session_is_refused_without_evicting_another(service: str) -> None:
    """A request naming a prefix of a session the service does not hold
    (evicted, released, a restarted instance) is refused before a session is
    made for it: it must not evict a session somebody else is using."""
    from dsi.backends import LocalDrafter, load_drafter_model
    from dsi.domain.errors import FailedPrecondition
    from dsi.domain.types import DraftRequest

    context = list(range(1, 41))
    named = {"prefix_length": 40, "prefix_hash": prefix_hash(context)}
    if service == "target":
        local = LocalTarget(load_target_model(SPEC), max_sessions=1)
        await local.verify(VerifyRequest("held", context, [], GREEDY, 1))
        run = local.verify(VerifyRequest("gone", [5], [], GREEDY, 1, **named))
    else:
        local = LocalDrafter(load_drafter_model(SPEC), max_sessions=1)
        async for _ in local.draft(DraftRequest("held", context, 2, 2)):
            pass
        run = anext(local.draft(DraftRequest("gone", [5], 2, 2, **named)))
    with pytest.raises(FailedPrecondition, match="does not hold the context prefix"):
        await run
    assert "held" in local.sessions and "gone" not in local.sessions and local.sessions.evicted == 0
