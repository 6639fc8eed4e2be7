"""OpenTelemetry tracing: one generation is one trace across the services.

Real gRPC servers on loopback (targets, a drafter, the coordinator) in this
process, spans caught by the SDK's in-memory exporter. The server spans get
their parent only from the ``traceparent`` metadata of the call (a grpc.aio
server runs each handler in a task of its own, whose context knows nothing of
the caller's), so the parent/child links checked here went over the wire.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dsi.serving import tracing
from dsi.wire import transport
from dsi.wire.client import Client, request
from services.coordinator.coordinator import GenerateInput
from tests.helpers import local_cluster

T_SPEC = "synthetic:vocab=300,seed=9,tpot_ms=4"
D_SPEC = "synthetic:vocab=300,seed=9,tpot_ms=0.5,acceptance=0.7"
OUTCOMES = {"decided", "useless", "stale", "preempted", "failed", "abandoned"}


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    assert tracing.setup("dsi-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def by_name(finished, name: str) -> list:
    return [s for s in finished if s.name == name]


@pytest.mark.parametrize("strategy", ["dsi", "si"])
async def test_one_generation_is_one_trace_with_every_verification(spans, strategy):
    async with local_cluster([T_SPEC] * 4, [D_SPEC], serve_coordinator=True) as cl:
        for b in cl.local_targets:
            tracing.instrument_backend("target", b)
        for b in cl.local_drafters:
            tracing.instrument_backend("drafter", b)
        async with Client(cl.coordinator_address) as client:
            result = await client.generate(request(prompt_ids=[1, 2, 3], max_new_tokens=48, strategy=strategy))
    stats = result.stats
    finished = spans.get_finished_spans()
    ids = {s.context.span_id: s for s in finished}

    def parent(s):
        return ids.get(s.parent.span_id) if s.parent is not None else None

    (root,) = by_name(finished, "dsi.v1.GenerationService/Generate")
    # Start-up asked every peer for its Info (traces of their own); everything else is the generation's.
    others = {s.name for s in finished if s.context.trace_id != root.context.trace_id}
    assert others == {"dsi.v1.TargetService/Info", "dsi.v1.DrafterService/Info"}, "one generation, one trace"
    finished = [s for s in finished if s.context.trace_id == root.context.trace_id]
    assert root.kind is SpanKind.SERVER and root.parent is None
    (gen,) = by_name(finished, "generate")
    assert parent(gen) is root
    assert gen.attributes["dsi.strategy"] == strategy and gen.attributes["dsi.new_tokens"] == 48
    assert gen.attributes["dsi.finish_reason"] == "length"
    rejections = [e for e in gen.events if e.name == "rejected"]
    assert len(rejections) == gen.attributes["dsi.decided_drafts"] - gen.attributes["dsi.accepted_tokens"]

    # The coordinator's view: one Verify span per verification, each with its outcome.
    verifies = [s for s in by_name(finished, "Verify") if s.kind is SpanKind.CLIENT]
    assert len(verifies) == stats["verifications_started"]
    assert all(parent(v) is gen for v in verifies)
    outcomes = Counter(v.attributes["dsi.outcome"] for v in verifies)
    assert set(outcomes) <= OUTCOMES and outcomes["decided"] >= 1
    assert outcomes["stale"] + outcomes["useless"] >= stats["verifications_cancelled"]
    assert all("dsi.accepted" in v.attributes for v in verifies if v.attributes["dsi.outcome"] == "decided")
    assert {v.attributes["dsi.replica"] for v in verifies} <= {f"target {t.address}" for t in cl.targets}

    # The targets' view: each Verify RPC they answered is a child of the coordinator's span for it.
    served = by_name(finished, "dsi.v1.TargetService/Verify")
    assert served and all(s.kind is SpanKind.SERVER for s in served)
    for s in served:
        v = parent(s)
        assert v is not None and v.name == "Verify" and v.kind is SpanKind.CLIENT
        for key in ("dsi.base", "dsi.drafts"):
            assert s.attributes[key] == v.attributes[key]
        assert s.attributes["dsi.session_id"] == gen.attributes["dsi.session_id"]
    assert len({parent(s).context.span_id for s in served}) == len(served), "one RPC per verification span"
    answered = [s for s in served if "dsi.accepted" in s.attributes]
    for s in answered:  # the server's answer agrees with what the coordinator recorded
        v = parent(s)
        if "dsi.accepted" in v.attributes:
            assert v.attributes["dsi.accepted"] == s.attributes["dsi.accepted"]

    # Every forward pass of a target is a child of the Verify it ran for.
    forwards = by_name(finished, "target forward")
    assert len(forwards) == sum(t.counters.forward_passes for t in cl.local_targets)
    assert all(parent(f) is not None and parent(f).name == "dsi.v1.TargetService/Verify" for f in forwards)
    assert all(f.end_time >= f.start_time and f.attributes["dsi.computed_tokens"] >= 1 for f in forwards)

    # Draft streams: the coordinator's span, the drafter's span under it, forward passes under that.
    drafts = [s for s in by_name(finished, "Draft") if s.kind is SpanKind.CLIENT]
    assert len(drafts) == stats["draft_streams"] and all(parent(d) is gen for d in drafts)
    assert sum(d.attributes["dsi.drafted_tokens"] for d in drafts) == stats["drafted_tokens"]
    drafter_side = by_name(finished, "dsi.v1.DrafterService/Draft")
    assert drafter_side
    for s in drafter_side:
        d = parent(s)
        assert d is not None and d.name == "Draft" and d.attributes["dsi.start"] == s.attributes["dsi.start"]
    d_forwards = by_name(finished, "drafter forward")
    assert len(d_forwards) == sum(d.counters.forward_passes for d in cl.local_drafters)
    assert all(parent(f).name == "dsi.v1.DrafterService/Draft" for f in d_forwards)

    # Health checks and reflection are not traced; session releases are, in the same trace.
    assert not [s for s in finished if s.name.startswith("grpc.")]
    assert by_name(finished, "dsi.v1.TargetService/ReleaseSession")


async def test_errors_and_the_http_path_are_traced(spans):
    async with local_cluster([T_SPEC] * 2, [D_SPEC], serve_coordinator=True) as cl:
        async with Client(cl.coordinator_address) as client:
            with pytest.raises(Exception, match="outside the vocabulary"):
                await client.generate(request(prompt_ids=[1, 999], max_new_tokens=4))
        finished = spans.get_finished_spans()
        (root,) = by_name(finished, "dsi.v1.GenerationService/Generate")
        assert root.status.status_code is StatusCode.ERROR
        assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        spans.clear()
        # A generation not started by a gRPC call (the OpenAI-compatible API) is a trace of its own.
        outs = [o async for o in cl.coordinator.generate(GenerateInput(prompt_token_ids=[1, 2], max_new_tokens=6))]
        assert outs[-1].finish_reason is not None
        finished = spans.get_finished_spans()
        (gen,) = by_name(finished, "generate")
        assert gen.parent is None and gen.attributes["dsi.new_tokens"] == 6
        assert len({s.context.trace_id for s in finished}) == 1


async def test_a_cancelled_generation_closes_every_span(spans):
    slow = "synthetic:vocab=300,seed=9,tpot_ms=30"
    async with local_cluster([slow] * 2, [D_SPEC], serve_coordinator=True) as cl:
        async with Client(cl.coordinator_address) as client:
            stream = client.stream(request(prompt_ids=[1, 2, 3], max_new_tokens=200, strategy="dsi"))
            async for msg in stream:
                if msg.token_ids:
                    break
            await stream.aclose()
        await asyncio.sleep(0.2)  # the server notices the cancellation
        await asyncio.wait_for(cl.coordinator._none_running.wait(), 5)
    finished = spans.get_finished_spans()
    (gen,) = by_name(finished, "generate")
    assert gen.attributes.get("dsi.cancelled") is True
    verifies = [s for s in by_name(finished, "Verify") if s.kind is SpanKind.CLIENT]
    assert verifies and "abandoned" in {v.attributes["dsi.outcome"] for v in verifies}
    assert not tracing._state.expected, "no span is left waiting for a call that never came"
    assert not tracing._state.sessions


def test_tracing_off_installs_nothing(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    assert not tracing.setup("dsi-test")
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    assert [i for make in transport.CHANNEL_INTERCEPTORS for i in make()] == []

    class Backend:
        on_forward = None

    b = Backend()
    tracing.instrument_backend("target", b)  # type: ignore[arg-type]
    assert b.on_forward is None


@pytest.mark.parametrize(
    ("endpoint", "env", "expected"),
    [
        (None, {}, None),
        ("http://collector:4317", {}, "otlp"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "otlp"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, "otlp"),
        (None, {"OTEL_TRACES_EXPORTER": "console"}, "console"),
        (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, None),
        ("http://collector:4317", {"OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_what_turns_tracing_on(endpoint, env, expected):
    assert tracing.wanted(endpoint, env) == expected


def test_bad_tracing_settings_are_clear_errors():
    from dsi.domain.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="zipkin"):
        tracing.wanted(None, {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(InvalidArgument, match="gRPC only"):
        tracing.setup("x", "http://c:4318", env={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert not tracing.enabled()


async def test_a_call_sent_again_after_a_refused_prefix_is_a_child_of_its_span_too(spans):
    """A Verify whose context prefix the target refuses goes out again with
    the whole context: both RPCs are children of the coordinator's span for
    that verification, not of the generation's."""
    from dsi.backends import LocalTarget, load_target_model
    from dsi.domain.types import GREEDY, VerifyRequest
    from dsi.serving.server import start_server
    from services.target.service import register as register_target

    local = LocalTarget(load_target_model(T_SPEC))
    running = await start_server(register_target(local), "127.0.0.1", 0)
    target = transport.GrpcTarget(running.address, timeout=20)
    try:
        await target.info()
        assert target.sent is not None and target.stream is None  # traced: unary Verify calls
        context = list(range(1, 41))
        tracer = tracing.tracer()
        first = tracer.start_span("Verify")
        tracing.expect_call(tracing.verify_key("s", 40, 0), first)
        await target.verify(VerifyRequest("s", context, [], GREEDY, 1))
        first.end()
        assert await local.release_session("s")  # behind the client's back: the next prefix is refused
        second = tracer.start_span("Verify")
        tracing.expect_call(tracing.verify_key("s", 41, 0), second)
        await target.verify(VerifyRequest("s", [*context, 5], [], GREEDY, 1))
        second.end()
        assert target.prefix_misses == 1
    finally:
        await target.close()
        await running.stop(0)
    served = by_name(spans.get_finished_spans(), "dsi.v1.TargetService/Verify")
    parents = [s.parent.span_id for s in served]
    assert parents == [first.context.span_id, second.context.span_id, second.context.span_id]
    assert [s.status.status_code for s in served][1] is StatusCode.ERROR  # the refused one
