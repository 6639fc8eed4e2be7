"""The target and drafter services over real gRPC.

Servers run in-process on ephemeral loopback ports with synthetic models, and
the tests talk to them with the raw generated stubs (dsi.v1), so what is
checked is the wire contract. Server-side effects (counters, sessions, active
streams) are read from the in-process LocalTarget / LocalDrafter objects.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain import errors
from dsi.domain.types import DraftRequest, VerifyRequest
from dsi.serving.server import start_server
from dsi.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.drafter.service import SERVICE_NAME as DRAFTER_SERVICE
from services.drafter.service import register as register_drafter
from services.target.service import SERVICE_NAME as TARGET_SERVICE
from services.target.service import register as register_target
from tests.helpers import LOOPBACK, eventually, serve

VOCAB = 100
MAX_CONTEXT = 16
TARGET_SPEC = f"synthetic:vocab={VOCAB},seed=1,max_context={MAX_CONTEXT}"
DRAFTER_SPEC = f"synthetic:vocab={VOCAB},seed=1,max_context={MAX_CONTEXT}"
MAX_DRAFT_TOKENS = 4
MAX_LOOKAHEAD = 4
CONTEXT = [1, 2, 3]
GREEDY = common_pb2.SamplingParams()
SAMPLE = common_pb2.SamplingParams(temperature=1.0)


# --- fixtures and helpers ----------------------------------------------------


@dataclass
class TargetEnv:
    local: LocalTarget
    address: str
    stub: target_pb2_grpc.TargetServiceStub
    channel: grpc.aio.Channel


@dataclass
class DrafterEnv:
    local: LocalDrafter
    address: str
    stub: drafter_pb2_grpc.DrafterServiceStub
    channel: grpc.aio.Channel


@asynccontextmanager
async def target_env(spec: str = TARGET_SPEC, **kwargs: Any) -> AsyncIterator[TargetEnv]:
    kwargs.setdefault("max_draft_tokens", MAX_DRAFT_TOKENS)
    local = LocalTarget(load_target_model(spec), **kwargs)
    async with serve(register_target(local)) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            yield TargetEnv(local, srv.address, target_pb2_grpc.TargetServiceStub(channel), channel)


@asynccontextmanager
async def drafter_env(spec: str = DRAFTER_SPEC, **kwargs: Any) -> AsyncIterator[DrafterEnv]:
    kwargs.setdefault("max_lookahead", MAX_LOOKAHEAD)
    local = LocalDrafter(load_drafter_model(spec), **kwargs)
    async with serve(register_drafter(local)) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            yield DrafterEnv(local, srv.address, drafter_pb2_grpc.DrafterServiceStub(channel), channel)


@pytest.fixture
async def target() -> AsyncIterator[TargetEnv]:
    async with target_env() as env:
        yield env


@pytest.fixture
async def drafter() -> AsyncIterator[DrafterEnv]:
    async with drafter_env() as env:
        yield env


def dist(ids: list[int], probs: list[float]) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=ids, probs=probs)


def draft(token_id: int, ids: list[int] | None = None, probs: list[float] | None = None) -> common_pb2.DraftToken:
    """A draft token; with ``ids``/``probs`` it carries that distribution."""
    if ids is None:
        return common_pb2.DraftToken(token_id=token_id)
    return common_pb2.DraftToken(token_id=token_id, distribution=dist(ids, probs or []))


def verify_req(
    context: list[int] = CONTEXT,
    drafts: list[common_pb2.DraftToken] = (),  # type: ignore[assignment]
    sampling: common_pb2.SamplingParams = GREEDY,
    session_id: str = "s",
    seed: int = 0,
) -> target_pb2.VerifyRequest:
    return target_pb2.VerifyRequest(
        session_id=session_id, context_token_ids=context, draft_tokens=list(drafts), sampling=sampling, seed=seed
    )


def draft_req(
    context: list[int] = CONTEXT,
    lookahead: int = 2,
    max_tokens: int = 4,
    sampling: common_pb2.SamplingParams = GREEDY,
    session_id: str = "s",
    seed: int = 0,
) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(
        session_id=session_id,
        context_token_ids=context,
        lookahead=lookahead,
        max_tokens=max_tokens,
        sampling=sampling,
        seed=seed,
    )


async def read_all(call: Any, limit: int = 1000) -> list[Any]:
    """Every message of a server stream (bounded)."""
    out = []
    for _ in range(limit):
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return out
        out.append(msg)
    raise AssertionError(f"stream did not end within {limit} messages")


def target_argmax(env: TargetEnv, tokens: list[int]) -> int:
    return int(np.argmax(env.local.model.lm.logits(tokens)))


def target_support(env: TargetEnv, tokens: list[int]) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(env.local.model.lm.logits(tokens)))}


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# --- Info, health, reflection ------------------------------------------------


async def test_target_info_reports_model_limits_and_counters() -> None:
    async with target_env(max_sessions=7, session_idle_timeout=12.5) as env:
        info = await env.stub.Info(target_pb2.TargetServiceInfoRequest())
        assert info.model.model_id == TARGET_SPEC
        assert info.model.backend == "synthetic"
        assert info.model.vocab_size == VOCAB
        assert info.model.max_context_tokens == MAX_CONTEXT
        assert info.model.device == "virtual"
        assert info.model.tokenizer_fingerprint
        assert info.limits.max_draft_tokens == MAX_DRAFT_TOKENS
        assert info.limits.max_sessions == 7
        assert info.limits.session_idle_timeout_seconds == pytest.approx(12.5)
        assert info.counters.requests == 0 and info.counters.forward_passes == 0 and info.counters.sessions == 0

        await env.stub.Verify(verify_req(session_id="a"))
        await env.stub.Verify(verify_req(context=[*CONTEXT, 4], session_id="a"))
        info = await env.stub.Info(target_pb2.TargetServiceInfoRequest())
        c = info.counters
        assert (c.requests, c.forward_passes, c.sessions, c.busy_sessions) == (2, 2, 1, 0)
        assert c.computed_tokens == len(CONTEXT) + 1  # the second request reused the cached prefix
        assert c.cached_tokens == len(CONTEXT)
        assert c.cancelled_requests == 0 and c.drafted_tokens == 0


async def test_drafter_info_reports_model_limits_and_counters(drafter: DrafterEnv) -> None:
    info = await drafter.stub.Info(drafter_pb2.DrafterServiceInfoRequest())
    assert info.model.model_id == DRAFTER_SPEC
    assert info.model.vocab_size == VOCAB
    assert info.limits.max_lookahead == MAX_LOOKAHEAD
    assert info.limits.max_sessions == 256
    assert info.counters.drafted_tokens == 0

    chunks = await read_all(drafter.stub.Draft(draft_req(lookahead=2, max_tokens=5)))
    assert [len(c.tokens) for c in chunks] == [2, 2, 1]
    info = await drafter.stub.Info(drafter_pb2.DrafterServiceInfoRequest())
    assert info.counters.drafted_tokens == 5
    assert info.counters.requests == 1
    assert info.counters.sessions == 1
    assert info.counters.cancelled_requests == 0


@asynccontextmanager
async def any_env(kind: str) -> AsyncIterator[tuple[str, grpc.aio.Channel]]:
    if kind == "target":
        async with target_env() as t:
            yield TARGET_SERVICE, t.channel
    else:
        async with drafter_env() as d:
            yield DRAFTER_SERVICE, d.channel


@pytest.mark.parametrize("kind", ["target", "drafter"])
async def test_health_reports_serving(kind: str) -> None:
    async with any_env(kind) as (service, channel):
        assert service == f"dsi.v1.{kind.capitalize()}Service"
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", service]:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health.Check(health_pb2.HealthCheckRequest(service="dsi.v1.NoSuchService"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("kind", ["target", "drafter"])
async def test_reflection_lists_services(kind: str) -> None:
    async with any_env(kind) as (service, channel):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
                ]
            )
        )
        responses = await read_all(call, limit=10)
        assert len(responses) == 2
        names = {s.name for s in responses[0].list_services_response.service}
        assert names == {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        # The service's descriptor can be fetched too (what grpcurl needs).
        files = responses[1].file_descriptor_response.file_descriptor_proto
        assert files, responses[1]
        assert not responses[1].HasField("error_response")


# --- Verify / Draft happy paths ----------------------------------------------


async def test_verify_greedy_decides_drafts_against_argmax(target: TargetEnv) -> None:
    # No drafts: one plain decoding step.
    resp = await target.stub.Verify(verify_req(session_id="g"))
    t1 = target_argmax(target, CONTEXT)
    assert resp.next_token_id == t1
    assert resp.num_accepted == 0 and len(resp.decisions) == 0
    assert resp.stats.computed_tokens == len(CONTEXT) and resp.stats.cached_tokens == 0

    # A right draft, then a wrong one: accept, then reject with the argmax as correction.
    t2 = target_argmax(target, [*CONTEXT, t1])
    wrong = (t2 + 1) % VOCAB
    resp = await target.stub.Verify(verify_req(drafts=[draft(t1), draft(wrong)], session_id="g"))
    assert [(d.accepted, d.token_id) for d in resp.decisions] == [(True, t1), (False, t2)]
    assert resp.num_accepted == 1
    assert resp.next_token_id == t2
    assert resp.stats.cached_tokens == len(CONTEXT) - 1  # the last context token is recomputed as a row
    assert resp.stats.compute_seconds >= 0 and resp.stats.queue_seconds >= 0

    # Every draft accepted: next_token_id follows the last draft. Drafts may still carry
    # distributions (a deprecated field): they are ignored, even malformed ones.
    t3 = target_argmax(target, [*CONTEXT, t1, t2])
    resp = await target.stub.Verify(verify_req(drafts=[draft(t1, [t1, VOCAB], [0.7]), draft(t2)], session_id="g"))
    assert resp.num_accepted == 2 and all(d.accepted for d in resp.decisions)
    assert resp.next_token_id == t3


async def test_verify_a_token_tree_returns_the_accepted_path(target: TargetEnv) -> None:
    """Two children of the context, the wrong one first; the right one has a
    right child and a wrong one: the path goes right, right."""
    t1 = target_argmax(target, CONTEXT)
    t2 = target_argmax(target, [*CONTEXT, t1])
    t3 = target_argmax(target, [*CONTEXT, t1, t2])
    tree = [
        common_pb2.DraftToken(token_id=(t1 + 1) % VOCAB, parent=-1),
        common_pb2.DraftToken(token_id=t1, parent=-1),
        common_pb2.DraftToken(token_id=(t2 + 1) % VOCAB, parent=1),
        common_pb2.DraftToken(token_id=t2, parent=1),
    ]
    resp = await target.stub.Verify(verify_req(drafts=tree, session_id="tree"))
    assert list(resp.accepted_path) == [1, 3] and resp.num_accepted == 2 and resp.next_token_id == t3
    assert [d.accepted for d in resp.decisions] == [False, True, False, True]
    # The session kept the context and the path: the next step reuses all of it.
    resp = await target.stub.Verify(verify_req(context=[*CONTEXT, t1, t2, t3], session_id="tree"))
    assert resp.stats.cached_tokens == len(CONTEXT) + 2


async def test_verify_sampling_with_drafts_from_the_drafter() -> None:
    """Drafts streamed by a drafter with acceptance 1 are all accepted by the
    target; with acceptance 0 the first is rejected and corrected from the
    target's support. Decisions are keyed by seed, so this is deterministic."""
    for acceptance, expect_all in [(1.0, True), (0.0, False)]:
        spec = f"synthetic:vocab={VOCAB},seed=1,max_context={MAX_CONTEXT},acceptance={acceptance}"
        async with target_env() as t, drafter_env(spec) as d:
            chunks = await read_all(d.stub.Draft(draft_req(lookahead=3, max_tokens=3, sampling=SAMPLE, seed=5)))
            assert len(chunks) == 1 and chunks[0].start_position == len(CONTEXT)
            tokens = list(chunks[0].tokens)
            assert len(tokens) == 3
            assert not any(tok.HasField("distribution") for tok in tokens), "drafts carry no distributions"
            resp = await t.stub.Verify(verify_req(drafts=tokens, sampling=SAMPLE, seed=5))
            assert len(resp.decisions) == 3
            ids = [tok.token_id for tok in tokens]
            if expect_all:
                assert resp.num_accepted == 3
                assert [dd.token_id for dd in resp.decisions] == ids
                assert resp.next_token_id in target_support(t, [*CONTEXT, *ids])
            else:
                assert resp.num_accepted == 0
                assert not resp.decisions[0].accepted
                assert ids[0] not in target_support(t, CONTEXT)
                assert resp.next_token_id == resp.decisions[0].token_id
                assert resp.next_token_id in target_support(t, CONTEXT)


async def test_release_session(target: TargetEnv, drafter: DrafterEnv) -> None:
    await target.stub.Verify(verify_req(session_id="r"))
    assert "r" in target.local.sessions
    req = target_pb2.TargetServiceReleaseSessionRequest(session_id="r")
    assert (await target.stub.ReleaseSession(req)).released is True
    assert len(target.local.sessions) == 0
    assert (await target.stub.ReleaseSession(req)).released is False

    await read_all(drafter.stub.Draft(draft_req(session_id="r")))
    assert len(drafter.local.sessions) == 1
    dreq = drafter_pb2.DrafterServiceReleaseSessionRequest(session_id="r")
    assert (await drafter.stub.ReleaseSession(dreq)).released is True
    assert len(drafter.local.sessions) == 0
    assert (await drafter.stub.ReleaseSession(dreq)).released is False


async def test_a_request_that_a_release_overtook_is_cancelled_and_holds_nothing(
    target: TargetEnv, drafter: DrafterEnv
) -> None:
    """The coordinator cancels a call on its stream and releases the session by
    a unary call: the release may arrive first. The late request gets
    CANCELLED instead of a session nobody would release."""
    req = target_pb2.TargetServiceReleaseSessionRequest(session_id="late")
    assert (await target.stub.ReleaseSession(req)).released is False
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await target.stub.Verify(verify_req(session_id="late"))
    assert err.value.code() == grpc.StatusCode.CANCELLED and "released before" in (err.value.details() or "")
    assert len(target.local.sessions) == 0

    dreq = drafter_pb2.DrafterServiceReleaseSessionRequest(session_id="late")
    assert (await drafter.stub.ReleaseSession(dreq)).released is False
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(drafter.stub.Draft(draft_req(session_id="late")))
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert len(drafter.local.sessions) == 0


async def test_limits_are_inclusive(target: TargetEnv, drafter: DrafterEnv) -> None:
    """Exactly at the limits is accepted (the error tests below go one past)."""
    ctx = list(range(1, MAX_CONTEXT - MAX_DRAFT_TOKENS + 1))
    t = target_argmax(target, ctx)
    resp = await target.stub.Verify(verify_req(context=ctx, drafts=[draft(t)] * MAX_DRAFT_TOKENS))
    assert len(resp.decisions) == MAX_DRAFT_TOKENS
    # The drafter needs room for one token after the context.
    chunks = await read_all(
        drafter.stub.Draft(draft_req(context=list(range(MAX_CONTEXT - 1)), lookahead=MAX_LOOKAHEAD))
    )
    assert [len(c.tokens) for c in chunks] == [1]


# --- bad input ---------------------------------------------------------------

LONG_ID = "x" * 129

VERIFY_ERRORS: dict[str, tuple[Callable[[], target_pb2.VerifyRequest], str]] = {
    "empty context": (lambda: verify_req(context=[]), "must not be empty"),
    "context id outside vocab": (lambda: verify_req(context=[1, VOCAB, 2]), "context_token_ids[1] = 100"),
    "draft id outside vocab": (lambda: verify_req(drafts=[draft(5), draft(VOCAB)]), "draft_tokens[1] = 100"),
    "context alone too long": (lambda: verify_req(context=[1] * (MAX_CONTEXT + 1)), "exceeds the model's limit"),
    "context plus drafts too long": (
        lambda: verify_req(context=[1] * (MAX_CONTEXT - 2), drafts=[draft(1)] * 3),
        "plus 3 draft tokens exceeds",
    ),
    "too many drafts": (lambda: verify_req(drafts=[draft(1)] * (MAX_DRAFT_TOKENS + 1)), "exceed the limit of 4"),
    "parent not earlier": (
        lambda: verify_req(drafts=[common_pb2.DraftToken(token_id=3, parent=1), draft(4)]),
        "draft_tokens[0].parent = 1",
    ),
    "parent below -1": (lambda: verify_req(drafts=[common_pb2.DraftToken(token_id=3, parent=-2)]), "parent = -2"),
    "negative temperature": (
        lambda: verify_req(sampling=common_pb2.SamplingParams(temperature=-0.5)),
        "temperature",
    ),
    "nan temperature": (lambda: verify_req(sampling=common_pb2.SamplingParams(temperature=math.nan)), "temperature"),
    "top_p above 1": (lambda: verify_req(sampling=common_pb2.SamplingParams(temperature=1, top_p=1.5)), "top_p"),
    "negative top_p": (lambda: verify_req(sampling=common_pb2.SamplingParams(temperature=1, top_p=-0.1)), "top_p"),
    "empty session id": (lambda: verify_req(session_id=""), "session_id must not be empty"),
    "long session id": (lambda: verify_req(session_id=LONG_ID), "longer than 128"),
}


@pytest.mark.parametrize("case", list(VERIFY_ERRORS))
async def test_verify_bad_input_is_invalid_argument(target: TargetEnv, case: str) -> None:
    build, keyword = VERIFY_ERRORS[case]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await target.stub.Verify(build())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert keyword in exc.value.details()
    # Nothing reached the model, nothing crashed, no session was created.
    info = await target.stub.Info(target_pb2.TargetServiceInfoRequest())
    assert info.counters.forward_passes == 0 and info.counters.requests == 0 and info.counters.sessions == 0
    assert (await target.stub.Verify(verify_req())).next_token_id == target_argmax(target, CONTEXT)


DRAFT_ERRORS: dict[str, tuple[Callable[[], drafter_pb2.DraftRequest], str]] = {
    "empty context": (lambda: draft_req(context=[]), "must not be empty"),
    "context id outside vocab": (lambda: draft_req(context=[VOCAB + 5]), "context_token_ids[0] = 105"),
    "context leaves no room": (
        lambda: draft_req(context=[1] * MAX_CONTEXT),
        "context of 16 tokens plus 1 token to draft exceeds",
    ),
    "lookahead 0": (lambda: draft_req(lookahead=0), "lookahead must lie in 1..4, got 0"),
    "lookahead above max": (lambda: draft_req(lookahead=MAX_LOOKAHEAD + 1), "lookahead must lie in 1..4, got 5"),
    "negative temperature": (lambda: draft_req(sampling=common_pb2.SamplingParams(temperature=-1)), "temperature"),
    "inf temperature": (lambda: draft_req(sampling=common_pb2.SamplingParams(temperature=math.inf)), "temperature"),
    "top_p above 1": (lambda: draft_req(sampling=common_pb2.SamplingParams(temperature=1, top_p=2)), "top_p"),
    "empty session id": (lambda: draft_req(session_id=""), "session_id must not be empty"),
    "long session id": (lambda: draft_req(session_id=LONG_ID), "longer than 128"),
}


@pytest.mark.parametrize("case", list(DRAFT_ERRORS))
async def test_draft_bad_input_is_invalid_argument(drafter: DrafterEnv, case: str) -> None:
    build, keyword = DRAFT_ERRORS[case]
    call = drafter.stub.Draft(build())
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await read_all(call)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert keyword in exc.value.details()
    info = await drafter.stub.Info(drafter_pb2.DrafterServiceInfoRequest())
    assert info.counters.drafted_tokens == 0 and info.counters.sessions == 0
    assert drafter.local.active_streams == 0
    assert len(await read_all(drafter.stub.Draft(draft_req()))) == 2  # still serving


# --- resource limits ---------------------------------------------------------

SLOW = f"synthetic:vocab={VOCAB},seed=1,ttft_ms=300,tpot_ms=300"


async def test_target_refuses_new_session_when_all_are_busy() -> None:
    async with target_env(SLOW, max_sessions=1) as env:
        first = env.stub.Verify(verify_req(session_id="one"))
        await eventually(lambda: env.local.sessions.is_busy("one"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await env.stub.Verify(verify_req(session_id="two"))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sessions are busy" in exc.value.details()
        # Refused at once, not queued behind the running request: that one is still running.
        assert not first.done() and env.local.sessions.is_busy("one")
        info = await env.stub.Info(target_pb2.TargetServiceInfoRequest())
        assert (info.counters.sessions, info.counters.busy_sessions) == (1, 1)
        assert info.counters.cancelled_requests == 0

        await first
        # Once the first session is idle it is evicted to make room.
        resp = await env.stub.Verify(verify_req(session_id="two"))
        assert resp.next_token_id == target_argmax(env, CONTEXT)
        assert len(env.local.sessions) == 1 and "two" in env.local.sessions and "one" not in env.local.sessions
        assert env.local.sessions.evicted == 1


async def test_drafter_refuses_new_session_when_all_are_busy() -> None:
    async with drafter_env(SLOW, max_sessions=1) as env:
        first = env.stub.Draft(draft_req(session_id="one", max_tokens=0))
        await eventually(lambda: env.local.sessions.is_busy("one"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await read_all(env.stub.Draft(draft_req(session_id="two")))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sessions are busy" in exc.value.details()
        assert not first.done() and env.local.sessions.is_busy("one")
        first.cancel()
        await eventually(lambda: env.local.active_streams == 0)
        assert len(await read_all(env.stub.Draft(draft_req(session_id="two", max_tokens=1)))) == 1


async def test_drafter_refusal_is_not_counted_as_cancelled() -> None:
    async with drafter_env(SLOW, max_sessions=1) as env:
        first = env.stub.Draft(draft_req(session_id="one", max_tokens=0))
        await eventually(lambda: env.local.sessions.is_busy("one"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await read_all(env.stub.Draft(draft_req(session_id="two")))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        try:
            # No client cancelled anything yet.
            assert env.local.counters.cancelled_requests == 0
        finally:
            first.cancel()
            await eventually(lambda: env.local.active_streams == 0)


# --- cancellation ------------------------------------------------------------

TPOT_MS = 20
STREAMING = f"synthetic:vocab={VOCAB},seed=1,ttft_ms={TPOT_MS},tpot_ms={TPOT_MS}"


async def test_cancelled_draft_stream_stops_on_the_server() -> None:
    async with drafter_env(STREAMING) as env:
        local = env.local
        call = env.stub.Draft(draft_req(session_id="c", lookahead=2, max_tokens=0))
        first = await call.read()
        second = await call.read()
        assert first.start_position == len(CONTEXT) and second.start_position == len(CONTEXT) + 2
        assert local.active_streams == 1 and local.sessions.is_busy("c")

        at_cancel = local.counters.drafted_tokens
        call.cancel()
        await eventually(lambda: local.active_streams == 0, timeout=5.0)
        stopped = local.counters.drafted_tokens
        # Within about one token step of the cancel (the step in progress may finish).
        assert stopped - at_cancel <= 2, (at_cancel, stopped)
        # And it stays stopped: several token periods later nothing more was drafted.
        await asyncio.sleep(10 * TPOT_MS / 1000)
        assert local.counters.drafted_tokens == stopped
        assert local.counters.cancelled_requests == 1
        assert local.counters.requests == 0
        # The session is idle and kept for reuse.
        assert not local.sessions.is_busy("c") and len(local.sessions) == 1

        # A new Draft on the same session works at once and reuses the cache.
        chunks = await read_all(env.stub.Draft(draft_req(session_id="c", lookahead=1, max_tokens=4)))
        assert [len(c.tokens) for c in chunks] == [1, 1, 1, 1]
        assert chunks[0].stats.cached_tokens == len(CONTEXT) - 1
        # Same context, same seed, greedy: the same drafts as the cancelled stream.
        assert [c.tokens[0].token_id for c in chunks] == [t.token_id for t in [*first.tokens, *second.tokens]]
        assert local.counters.requests == 1 and local.counters.cancelled_requests == 1

        rel = drafter_pb2.DrafterServiceReleaseSessionRequest(session_id="c")
        assert (await env.stub.ReleaseSession(rel)).released
        assert len(local.sessions) == 0
        chunks = await read_all(env.stub.Draft(draft_req(session_id="c", lookahead=1, max_tokens=1)))
        assert chunks[0].stats.cached_tokens == 0  # a fresh session after the release
        assert chunks[0].stats.computed_tokens == len(CONTEXT)


async def test_closing_grpc_drafter_iterator_cancels_the_stream() -> None:
    async with drafter_env(STREAMING) as env:
        client = GrpcDrafter(env.address)
        try:
            stream = client.draft(DraftRequest(session_id="it", context=CONTEXT, lookahead=1))
            chunk = await anext(stream)
            assert chunk.start_position == len(CONTEXT) and len(chunk.tokens) == 1
            await stream.aclose()
            await eventually(lambda: env.local.active_streams == 0)
            assert env.local.counters.cancelled_requests == 1
            assert not env.local.sessions.is_busy("it")
        finally:
            await client.close()


async def test_verify_cancelled_while_queued_never_runs() -> None:
    async with target_env(SLOW) as env:
        local = env.local
        running = env.stub.Verify(verify_req(session_id="running"))
        await eventually(lambda: local.sessions.is_busy("running"))
        queued = env.stub.Verify(verify_req(session_id="queued"))
        await eventually(lambda: local.sessions.is_busy("queued"))
        assert local.counters.forward_passes == 0  # the first forward is still running

        queued.cancel()
        await eventually(lambda: local.counters.cancelled_requests == 1)
        assert not local.sessions.is_busy("queued")
        with pytest.raises(asyncio.CancelledError):
            await queued
        await running
        # Forwards run in arrival order: once a later request completes, the
        # cancelled one would have run before it if it were still queued.
        await env.stub.Verify(verify_req(session_id="after"))
        assert local.counters.forward_passes == 2
        assert local.counters.requests == 2
        assert local.counters.cancelled_requests == 1


async def test_cancelling_grpc_target_verify_task_cancels_on_server() -> None:
    async with target_env(SLOW) as env:
        client = GrpcTarget(env.address)
        try:
            task = asyncio.ensure_future(client.verify(VerifyRequest("t", CONTEXT)))
            await eventually(lambda: env.local.sessions.is_busy("t"))
            task.cancel()
            await eventually(lambda: env.local.counters.cancelled_requests == 1)
            assert env.local.counters.forward_passes == 0
            assert not env.local.sessions.is_busy("t")
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await client.close()


# --- client transport --------------------------------------------------------


async def test_grpc_target_maps_statuses_to_domain_errors() -> None:
    async with target_env(SLOW, max_sessions=1) as env:
        client = GrpcTarget(env.address, timeout=10.0)
        try:
            info = await client.info()
            assert info.model.vocab_size == VOCAB and info.limits.max_draft_tokens == MAX_DRAFT_TOKENS
            with pytest.raises(errors.InvalidArgument) as exc:
                await client.verify(VerifyRequest("x", []))
            assert str(exc.value).startswith(f"target {env.address}: ")
            assert "must not be empty" in str(exc.value)

            running = asyncio.ensure_future(client.verify(VerifyRequest("one", CONTEXT)))
            await eventually(lambda: env.local.sessions.is_busy("one"))
            with pytest.raises(errors.ResourceExhausted) as exc2:
                await client.verify(VerifyRequest("two", CONTEXT))
            assert env.address in str(exc2.value)
            result = await running
            assert result.next_token == int(np.argmax(env.local.model.lm.logits(CONTEXT)))
            assert await client.release_session("one") is True
            assert await client.release_session("one") is False
        finally:
            await client.close()


async def test_grpc_drafter_maps_statuses_to_domain_errors(drafter: DrafterEnv) -> None:
    client = GrpcDrafter(drafter.address, timeout=10.0)
    try:
        with pytest.raises(errors.InvalidArgument) as exc:
            async for _ in client.draft(DraftRequest("x", CONTEXT, lookahead=MAX_LOOKAHEAD + 1)):
                pass
        assert str(exc.value).startswith(f"drafter {drafter.address}: ")
        assert "lookahead" in str(exc.value)
        chunks = [c async for c in client.draft(DraftRequest("x", CONTEXT, lookahead=2, max_tokens=3))]
        assert [len(c.tokens) for c in chunks] == [2, 1]
    finally:
        await client.close()


async def test_unreachable_peer_is_unavailable_naming_the_address() -> None:
    address = f"{LOOPBACK}:{free_port()}"
    target = GrpcTarget(address, timeout=2.0)
    drafter = GrpcDrafter(address, timeout=2.0)
    try:
        with pytest.raises(errors.Unavailable) as exc:
            await target.info()
        assert f"target {address} is unavailable" in str(exc.value)
        with pytest.raises(errors.Unavailable) as exc:
            await target.verify(VerifyRequest("s", CONTEXT))
        assert address in str(exc.value)
        with pytest.raises(errors.Unavailable) as exc:
            async for _ in drafter.draft(DraftRequest("s", CONTEXT, lookahead=1)):
                pass
        assert f"drafter {address} is unavailable" in str(exc.value)
    finally:
        await target.close()
        await drafter.close()


# --- graceful shutdown -------------------------------------------------------


async def test_graceful_shutdown_flips_health_then_drains_then_closes() -> None:
    local = LocalTarget(load_target_model(f"synthetic:vocab={VOCAB},seed=1,ttft_ms=600"))
    running = await start_server(register_target(local), LOOPBACK, 0)
    address = running.address
    stopper = None
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = target_pb2_grpc.TargetServiceStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=TARGET_SERVICE))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            verify = stub.Verify(verify_req(session_id="draining"))
            await eventually(lambda: local.sessions.is_busy("draining"))

            stopper = asyncio.ensure_future(running.stop(grace=10.0, drain_delay=0.3))
            # Health flips first, while the server still answers (the drain delay).
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ["", TARGET_SERVICE]:
                resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING, name
            watch.cancel()
            assert not stopper.done()

            # The running Verify finishes within the grace period, then stop() returns.
            resp = await verify
            assert resp.next_token_id == int(np.argmax(local.model.lm.logits(CONTEXT)))
            await asyncio.wait_for(stopper, 10.0)
            assert local.counters.requests == 1 and local.counters.cancelled_requests == 0

        # The port is closed.
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await target_pb2_grpc.TargetServiceStub(channel).Info(
                    target_pb2.TargetServiceInfoRequest(), timeout=2.0
                )
            assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        with socket.socket() as s:
            assert s.connect_ex((LOOPBACK, running.port)) != 0
    finally:
        if stopper is None or not stopper.done():
            await running.server.stop(0)


async def test_draft_context_limit_message_names_the_models_limit(drafter: DrafterEnv) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await read_all(drafter.stub.Draft(draft_req(context=[1] * MAX_CONTEXT)))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit of {MAX_CONTEXT} tokens" in exc.value.details()


async def test_a_health_watch_reports_a_shutdown_that_began_during_its_previous_write() -> None:
    """The Watch stream's last message is NOT_SERVING even when shutdown begins
    while it is still writing SERVING (a loaded server: the CI flake)."""
    from dsi.serving.server import HealthServicer

    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    written: list[int] = []
    first_write_started, finish_first_write = asyncio.Event(), asyncio.Event()

    class SlowContext:
        async def write(self, message: health_pb2.HealthCheckResponse) -> None:
            written.append(message.status)
            if len(written) == 1:
                first_write_started.set()
                await finish_first_write.wait()

    watch = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(service=""), SlowContext()))
    await asyncio.wait_for(first_write_started.wait(), 5)
    await health.enter_graceful_shutdown()  # while SERVING is being written
    finish_first_write.set()
    await asyncio.wait_for(watch, 5)
    assert written == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


async def test_open_health_watch_does_not_hold_up_shutdown() -> None:
    local = LocalTarget(load_target_model(TARGET_SPEC))
    running = await start_server(register_target(local), LOOPBACK, 0)
    stopper = None
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopper = asyncio.ensure_future(running.stop(grace=30.0))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Nothing but the watch is running: stopping must not need the 30 s grace period.
            await asyncio.wait_for(asyncio.shield(stopper), 3.0)
    finally:
        await running.server.stop(0)
        if stopper is not None:
            await asyncio.wait_for(stopper, 10.0)
