"""Bounded work and bounded input (issue 16): request-size limits, caps on
concurrent generations and model calls (RESOURCE_EXHAUSTED beyond them),
stop-string limits in every API, malformed protobuf bytes answered with
INVALID_ARGUMENT (no traceback), and the coordinator's graceful wind-down
(running generations end with FINISH_REASON_CANCELLED and their stats).

In-process servers on 127.0.0.1; the memory bound itself is measured on
real processes in tests/test_memory.py."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain import errors
from dsi.serving.gate import MIN_MESSAGE_BYTES, Policy, default_message_limit
from dsi.serving.server import start_server
from dsi.v1 import drafter_pb2, drafter_pb2_grpc, generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc
from services.coordinator.coordinator import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    Coordinator,
    Defaults,
    GenerateInput,
)
from services.coordinator.engine import FinishReason, Strategy
from services.coordinator.openai_api import start_openai_api
from services.drafter.service import register as register_drafter
from services.target.service import SERVICE_NAME as TARGET_SERVICE
from services.target.service import register as register_target
from tests.helpers import LOOPBACK, eventually, local_cluster

T = "synthetic:vocab=300,seed=21,tpot_ms=1"
SLOW = "synthetic:vocab=300,seed=21,tpot_ms=20"
D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.6"
GARBAGE = b"\xff\xff\xff\xff\x0f\x0a\x03abc"


def stub(address: str) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(grpc.aio.insecure_channel(address))


async def first_tokens(call) -> None:
    async for msg in call:
        if msg.token_ids:
            return


# --- request size ---------------------------------------------------------------------------


def test_the_default_message_limit_fits_a_max_context_request_with_margin():
    assert default_message_limit(2048) == MIN_MESSAGE_BYTES == 256 << 10
    assert default_message_limit(131072) == 2 << 20  # 16 bytes per token
    # The largest legitimate requests, with the largest ids, fit with room to spare.
    for max_context, vocab in ((8192, 32000), (131072, 262144)):
        limit = default_message_limit(max_context)
        ids = [vocab - 1] * max_context
        verify = target_pb2.VerifyRequest(session_id="x" * 128, context_token_ids=ids[:-64])
        verify.draft_tokens.add().token_id = vocab - 1
        gen = generation_pb2.GenerateRequest(prompt_token_ids=ids, stop=["s" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS)
        text = generation_pb2.GenerateRequest(prompt="word " * max_context)  # ~5 bytes a token
        for msg in (verify, gen, text):
            assert msg.ByteSize() < limit / 2, (max_context, type(msg).__name__, msg.ByteSize(), limit)


async def test_a_request_over_the_message_limit_is_refused_unread():
    target = LocalTarget(load_target_model(T))
    running = await start_server(register_target(target), LOOPBACK, 0, Policy(max_message_bytes=64 * 1024))
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            s = target_pb2_grpc.TargetServiceStub(ch)
            big = target_pb2.VerifyRequest(session_id="s", context_token_ids=[1] * 70_000)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.Verify(big, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details()
            ok = await s.Verify(target_pb2.VerifyRequest(session_id="s", context_token_ids=[1, 2]), timeout=10)
            assert ok.next_token_id >= 0
        assert target.counters.requests == 1  # the big one never reached the backend
    finally:
        await running.stop(0)


async def test_a_huge_prompt_is_refused_without_being_copied():
    async with local_cluster([T], [D], serve_coordinator=True) as c:
        limit = c.coordinator.engine.max_context
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await first_tokens(
                stub(c.coordinator_address).Generate(
                    generation_pb2.GenerateRequest(prompt_token_ids=[1] * (limit + 1)), timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the prompt of {limit + 1} tokens leaves no room" in err.value.details()


# --- malformed bytes ---------------------------------------------------------------------------


async def test_malformed_protobuf_bytes_get_invalid_argument_and_no_traceback(caplog):
    target = LocalTarget(load_target_model(T))
    drafter = LocalDrafter(load_drafter_model(D))
    caplog.set_level(logging.INFO)
    async with local_cluster([T], [D], serve_coordinator=True) as c:
        t = await start_server(register_target(target), LOOPBACK, 0)
        d = await start_server(register_drafter(drafter), LOOPBACK, 0)
        try:
            calls = [
                (t.address, "unary_unary", "/dsi.v1.TargetService/Verify"),
                (t.address, "unary_unary", "/dsi.v1.TargetService/ReleaseSession"),
                (d.address, "unary_stream", "/dsi.v1.DrafterService/Draft"),
                (c.coordinator_address, "unary_stream", "/dsi.v1.GenerationService/Generate"),
                (c.coordinator_address, "unary_unary", "/grpc.health.v1.Health/Check"),
                (
                    c.coordinator_address,
                    "stream_stream",
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                ),
            ]
            for address, kind, method in calls:
                async with grpc.aio.insecure_channel(address) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        if kind == "unary_unary":
                            await ch.unary_unary(method)(GARBAGE, timeout=10)
                        elif kind == "unary_stream":
                            async for _ in ch.unary_stream(method)(GARBAGE, timeout=10):
                                pass
                        else:
                            async for _ in ch.stream_stream(method)(iter([GARBAGE]), timeout=10):
                                pass
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
                    assert "not a valid protobuf message" in err.value.details(), method
            # The services are fine afterwards.
            async with grpc.aio.insecure_channel(t.address) as ch:
                r = await target_pb2_grpc.TargetServiceStub(ch).Verify(
                    target_pb2.VerifyRequest(session_id="s", context_token_ids=[1]), timeout=10
                )
                assert r.next_token_id >= 0
        finally:
            await t.stop(0)
            await d.stop(0)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


# --- concurrency caps -----------------------------------------------------------------------------


async def test_a_target_refuses_verifications_beyond_its_cap_but_answers_info_and_health():
    target = LocalTarget(load_target_model("synthetic:vocab=300,seed=21,ttft_ms=500,tpot_ms=500"))
    policy = Policy(max_concurrent=2, limited=frozenset({f"/{TARGET_SERVICE}/Verify"}))
    running = await start_server(register_target(target), LOOPBACK, 0, policy)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            s = target_pb2_grpc.TargetServiceStub(ch)

            def verify(i: int):
                return s.Verify(target_pb2.VerifyRequest(session_id=f"s{i}", context_token_ids=[1, 2]), timeout=20)

            busy = [asyncio.ensure_future(verify(i)) for i in range(2)]
            await eventually(lambda: target.sessions.busy == 2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await verify(2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 concurrent requests" in err.value.details()
            info = await s.Info(target_pb2.TargetServiceInfoRequest(), timeout=5)  # not capped
            assert info.counters.busy_sessions == 2
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.gather(*busy)
            # Slots are given back when calls end, cancelled ones included (a call cancelled during
            # its forward pass ends on the server when that pass does: the device still writes its
            # session until then).
            cancelled = asyncio.ensure_future(verify(3))
            await eventually(lambda: target.sessions.busy == 1)
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            await eventually(lambda: target.sessions.busy == 0 and target.counters.cancelled_requests == 1)
            await asyncio.gather(verify(4), verify(5))
    finally:
        await running.stop(0)


async def test_the_coordinator_caps_generations_on_both_apis():
    defaults = Defaults(max_generations=2)
    async with local_cluster([SLOW], [D], serve_coordinator=True, defaults=defaults) as c:
        assert c.coordinator.max_generations == 2
        _, http = await start_openai_api(c.coordinator, LOOPBACK, 0, "m", grace=0.5)
        s = stub(c.coordinator_address)
        long = generation_pb2.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=500, strategy=1)
        calls = [s.Generate(long, timeout=30) for _ in range(2)]
        try:
            for call in calls:
                await first_tokens(call)
            assert c.coordinator.running == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await first_tokens(s.Generate(long, timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 generations" in err.value.details()
            async with aiohttp.ClientSession() as session:
                body = {"prompt": [1, 2], "max_tokens": 5}
                async with session.post(f"{http.url}/v1/completions", json=body) as r:
                    assert r.status == 429 and (await r.json())["error"]["code"] == "resource_exhausted"
                calls[0].cancel()
                await eventually(lambda: c.coordinator.running == 1)
                async with session.post(f"{http.url}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
        finally:
            for call in calls:
                call.cancel()
            await http.stop()
        await eventually(lambda: c.coordinator.running == 0)


async def test_the_default_cap_is_what_the_replicas_have_sessions_for():
    async with local_cluster([T, T], [D, D], max_sessions=3) as c:
        assert c.coordinator.max_generations == 3  # every target: 3; the drafters together: 6
    async with local_cluster([T], [D], max_sessions=5, defaults=Defaults(max_generations=40)) as c:
        assert c.coordinator.max_generations == 40


# --- stop strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "needle"),
    [
        ([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)], f"at most {MAX_STOP_STRINGS} stop strings"),
        (["ok", "x" * (MAX_STOP_LENGTH + 1)], f"at most {MAX_STOP_LENGTH}"),
    ],
)
async def test_stop_strings_are_limited_in_every_api(stop, needle):
    async with local_cluster([T], [D], serve_coordinator=True) as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await first_tokens(
                stub(c.coordinator_address).Generate(
                    generation_pb2.GenerateRequest(prompt_token_ids=[1], max_new_tokens=4, stop=stop), timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
        _, http = await start_openai_api(c.coordinator, LOOPBACK, 0, "m", grace=0.5)
        try:
            async with aiohttp.ClientSession() as session:
                body = {"prompt": [1], "max_tokens": 4, "stop": stop}
                async with session.post(f"{http.url}/v1/completions", json=body) as r:
                    err_body = (await r.json())["error"]
                    assert r.status == 400 and err_body["param"] == "stop", err_body
                # At the limits exactly: accepted.
                body["stop"] = [chr(ord("a") + i) * MAX_STOP_LENGTH for i in range(MAX_STOP_STRINGS)]
                async with session.post(f"{http.url}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
        finally:
            await http.stop()


# --- bad JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json
        b"[" * 100_000,
        b'{"prompt": [1], "temperature": ' + b"[" * 900 + b"]" * 900 + b"}",  # parses; too deep to print
        b'{"prompt": [1], "seed": ' + b"9" * 5000 + b"}",  # beyond Python's int-parsing limit
        b'{"prompt": [1], "max_tokens": 1e400}',
        b'{"prompt": [1], "stop": [' + b'"a",' * 2000 + b'"a"]}',
        b'{"prompt": [1], "stop": {"a": 1}}',
        b'{"messages": [{"role": "user", "content": [[[]]]}]}',
        b'{"prompt": "\xff\xfe"}',
        b"\x00\x01",
        b"",
    ],
)
async def test_bad_json_of_any_shape_gets_400(body):
    async with local_cluster([T], [D]) as c:
        _, http = await start_openai_api(c.coordinator, LOOPBACK, 0, "m", grace=0.5)
        try:
            async with aiohttp.ClientSession() as session:
                for path in ("/v1/completions", "/v1/chat/completions"):
                    headers = {"Content-Type": "application/json"}
                    async with session.post(f"{http.url}{path}", data=body, headers=headers) as r:
                        assert r.status == 400, (path, r.status, await r.text())
                        assert (await r.json())["error"]["type"] == "invalid_request_error"
        finally:
            await http.stop()


# --- shutdown ---------------------------------------------------------------------------------


async def test_shut_down_refuses_new_generations_and_cancels_the_rest_with_their_stats():
    target = LocalTarget(load_target_model(SLOW))
    drafter = LocalDrafter(load_drafter_model(D))
    coordinator = await Coordinator.connect([("t", target)], [("d", drafter)])
    outs: dict[str, list] = {"long": [], "short": []}

    async def consume(name: str, n: int) -> None:
        req = GenerateInput(prompt_token_ids=[1, 2, 3], max_new_tokens=n, strategy=Strategy.SI, lookahead=2)
        async for out in coordinator.generate(req):
            outs[name].append(out)

    try:
        long = asyncio.ensure_future(consume("long", 1000))
        await eventually(lambda: len(outs["long"]) >= 2)
        short = asyncio.ensure_future(consume("short", 6))
        await eventually(lambda: coordinator.running == 2)
        winding = asyncio.ensure_future(coordinator.shut_down(2.0))  # ample for the short one, even when loaded
        await asyncio.sleep(0)
        with pytest.raises(errors.Unavailable, match="shutting down"):
            async for _ in coordinator.generate(GenerateInput(prompt_token_ids=[1], max_new_tokens=2)):
                pass
        await asyncio.wait_for(asyncio.gather(long, short, winding), 10)
        # The short one finished within the grace, untouched.
        assert outs["short"][-1].finish_reason is FinishReason.LENGTH
        assert sum(len(o.token_ids) for o in outs["short"]) == 6
        # The long one was cut: a last output with CANCELLED and its stats.
        last = outs["long"][-1]
        tokens = sum(len(o.token_ids) for o in outs["long"])
        assert last.finish_reason is FinishReason.CANCELLED and last.stats is not None
        assert 0 < tokens < 1000 and last.stats.new_tokens == tokens
        assert last.stats.wall_seconds >= 2.0 and last.stats.target_forward_passes > 0
        assert all(o.finish_reason is None for o in outs["long"][:-1])
        assert coordinator.running == 0
        await eventually(lambda: len(target.sessions) == 0 and len(drafter.sessions) == 0)
    finally:
        await coordinator.close()


async def test_shut_down_with_nothing_running_returns_at_once():
    coordinator = await Coordinator.connect([("t", LocalTarget(load_target_model(T)))], [])
    try:
        await asyncio.wait_for(coordinator.shut_down(60), 1)
        assert not coordinator.accepting
    finally:
        await coordinator.close()


async def test_a_cap_counts_only_the_methods_it_names():
    """A drafter under a cap that names the target's Verify is not capped."""
    drafter = LocalDrafter(load_drafter_model(D))
    policy = Policy(max_concurrent=1, limited=frozenset({f"/{TARGET_SERVICE}/Verify"}))
    running = await start_server(register_drafter(drafter), LOOPBACK, 0, policy)
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            s = drafter_pb2_grpc.DrafterServiceStub(ch)

            async def chunks(i: int) -> int:
                req = drafter_pb2.DraftRequest(session_id=f"d{i}", context_token_ids=[1], lookahead=2, max_tokens=4)
                return len([c async for c in s.Draft(req, timeout=10)])

            assert await asyncio.gather(*(chunks(i) for i in range(3))) == [2, 2, 2]
    finally:
        await running.stop(0)
