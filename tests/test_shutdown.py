"""Graceful shutdown of the real processes (``python -m dsi ...``), as
Kubernetes does it: SIGTERM while a streamed ``Generate`` runs.

What the code does (``dsi/serving/server.py``): on SIGTERM a server reports
NOT_SERVING on the standard health service (a ``Watch`` stream gets the
change, then ends), waits ``--drain-delay`` seconds still serving, then calls
``server.stop(--grace)``: new RPCs are refused, running ones get ``--grace``
seconds, and whatever still runs then is cancelled.

* Coordinator: a ``Generate`` stream that ends within the grace completes
  normally, with the same tokens as without the shutdown; one that does not
  ends when the grace runs out with a last message carrying
  FINISH_REASON_CANCELLED and its stats (status OK), on the gRPC and on the
  HTTP API alike. Either way the process exits 0.
* New calls are refused once the server stops: UNAVAILABLE, or CANCELLED
  for a call that reached it just as it began to stop (gRPC's doing); dsi's
  clients report both as the peer being unavailable.
* Target: the generation goes on on the other replica (failover: the
  verification is issued again there) and completes, never hangs; during a
  drain delay the target still serves. (In Kubernetes, the preStop delay lets the
  coordinator drop the target from its pool before the SIGTERM, see
  docs/deploy.md.)

Every process listens on 127.0.0.1 only, every wait is bounded, and every
process is killed when a test ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.domain import errors
from dsi.v1 import drafter_pb2, drafter_pb2_grpc, generation_pb2, target_pb2, target_pb2_grpc
from dsi.wire.client import Client
from tests.procs import (
    LOOPBACK,
    finished,
    free_port,
    generate,
    request,
    start_cluster,
    until,
    wait_exit,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LENGTH = generation_pb2.FINISH_REASON_LENGTH
CANCELLED = generation_pb2.FINISH_REASON_CANCELLED


# --- RPCs --------------------------------------------------------------------------


@dataclass
class Watched:
    """A health Watch stream: each status with its arrival time, and how it ended."""

    statuses: list[tuple[float, int]] = field(default_factory=list)
    ended: float = 0.0
    code: grpc.StatusCode | None = None
    task: asyncio.Task | None = None

    def first(self, status: int) -> float:
        return next(t for t, s in self.statuses if s == status)


def watch_health(channel: grpc.aio.Channel) -> Watched:
    out = Watched()

    async def run() -> None:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        try:
            async for msg in call:
                out.statuses.append((time.monotonic(), msg.status))
            out.code = await call.code()
        except grpc.aio.AioRpcError as exc:
            out.code = exc.code()
        out.ended = time.monotonic()

    out.task = asyncio.ensure_future(run())
    return out


async def serving(channel: grpc.aio.Channel) -> Watched:
    watched = watch_health(channel)
    await until(lambda: watched.statuses, 10, "first health status")
    assert watched.statuses[0][1] == SERVING
    return watched


# --- the coordinator -----------------------------------------------------------------


async def test_coordinator_sigterm_lets_a_running_stream_finish_within_grace(tmp_path: Path) -> None:
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, coordinator=("--grace", "20"))
        coord = cluster.coordinator
        async with grpc.aio.insecure_channel(coord.address) as ch:
            reference = generate(ch, request(120))  # greedy: the same request gives the same tokens
            await finished(reference, 30)
            assert reference.code == grpc.StatusCode.OK and len(reference.tokens) == 120

            watched = await serving(ch)
            stream = generate(ch, request(120))
            await until(lambda: len(stream.tokens) >= 10 or stream.task.done(), 20, "the first tokens")
            sent = coord.sigterm()
            await finished(watched, 10)
            # Health flips first: NOT_SERVING reaches a watcher, whose stream then ends cleanly.
            assert [s for _, s in watched.statuses] == [SERVING, NOT_SERVING]
            assert watched.code == grpc.StatusCode.OK

            # A moment after the watch ended the server refuses new calls, while the
            # running stream goes on. (gRPC refuses them with UNAVAILABLE, or with
            # CANCELLED for one that reached the server as it began to stop: dsi's
            # client reports either as the coordinator being unavailable.)
            refused: errors.Unavailable | None = None
            deadline = time.monotonic() + 5
            while refused is None and time.monotonic() < deadline:
                try:
                    async with Client(coord.address) as client:
                        await asyncio.wait_for(client.generate(request(2)), 10)
                except errors.Unavailable as exc:
                    refused = exc
                else:
                    await asyncio.sleep(0.05)
            assert refused is not None and f"coordinator {coord.address} is unavailable" in str(refused)
            assert not stream.task.done(), "the running stream outlived the refusal of new calls"

            await finished(stream, 20)
            assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
            assert stream.finish_reason == LENGTH and stream.tokens == reference.tokens
            assert any(t > sent for t in stream.arrivals), "tokens kept streaming after SIGTERM"
            assert watched.first(NOT_SERVING) < stream.ended
            assert await wait_exit(coord, 10) == 0
        msgs = coord.messages()
        assert msgs.index("shutting down") < msgs.index("stopped") == len(msgs) - 1, msgs


@dataclass
class HttpStreamed:
    """An OpenAI API stream: its chunks, and whether it ended with [DONE]."""

    chunks: list[dict] = field(default_factory=list)
    done: bool = False
    status: int = 0
    task: asyncio.Task | None = None

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for ch in c.get("choices", []) for t in ch.get("token_ids", [])]


def http_generate(url: str, tokens: int) -> HttpStreamed:
    import aiohttp

    out = HttpStreamed()
    body = {"prompt": [1, 2, 3, 4], "max_tokens": tokens, "temperature": 0, "stream": True, "strategy": "dsi"}

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/completions", json=body) as resp:
            out.status = resp.status
            async for line in resp.content:
                text = line.decode().strip()
                if text == "data: [DONE]":
                    out.done = True
                elif text.startswith("data: "):
                    out.chunks.append(json.loads(text[6:]))

    out.task = asyncio.ensure_future(run())
    return out


async def test_coordinator_sigterm_past_grace_ends_streams_with_a_cancelled_last_message(tmp_path: Path) -> None:
    """A generation still running when the grace runs out ends with a last
    message: FINISH_REASON_CANCELLED and its stats (gRPC, status OK), or the
    OpenAI API's last chunk with ``finish_reason: "cancelled"`` and the
    ``dsi`` stats, then ``[DONE]``. The tokens sent are a prefix of what the
    generation would have produced."""
    grace = 1.0
    http_port = free_port()
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, coordinator=("--grace", str(grace), "--http-port", str(http_port)))
        coord = cluster.coordinator
        async with grpc.aio.insecure_channel(coord.address) as ch:
            reference = generate(ch, request(60))
            await finished(reference, 30)
            assert reference.code == grpc.StatusCode.OK and len(reference.tokens) == 60
            watched = await serving(ch)
            stream = generate(ch, request(2000))  # ~20 s: far longer than the grace
            web = http_generate(f"http://{LOOPBACK}:{http_port}", 2000)
            await until(lambda: len(stream.tokens) >= 10 or stream.task.done(), 20, "the first tokens")
            await until(lambda: len(web.tokens) >= 10 or web.task.done(), 20, "the first HTTP tokens")
            sent = coord.sigterm()
            await finished(stream, 15)
            await finished(web, 15)
            await finished(watched, 5)

            assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
            assert stream.finish_reason == CANCELLED and 0 < len(stream.tokens) < 2000
            assert stream.stats is not None and stream.stats.new_tokens == len(stream.tokens)
            assert stream.stats.wall_seconds > grace and stream.stats.target_forward_passes > 0
            n = min(len(stream.tokens), 60)  # (fewer than 60 on a loaded machine)
            assert stream.tokens[:n] == reference.tokens[:n]  # greedy: a prefix of the same generation
            assert any(t > sent for t in stream.arrivals), "tokens kept streaming during the grace"
            assert watched.first(NOT_SERVING) < stream.ended
            # Cut when the grace ran out (plus up to 1 s for health watchers to
            # end), not before, and long before the generation would have ended.
            assert grace <= stream.ended - sent < grace + 1.0 + 8.0, stream.ended - sent

            assert web.status == 200 and web.done, web
            last = web.chunks[-1]
            assert last["choices"][0]["finish_reason"] == "cancelled", last
            assert last["dsi"]["finish_reason"] == "cancelled"
            assert last["dsi"]["stats"]["new_tokens"] == len(web.tokens) > 0
            n = min(len(web.tokens), 60)
            assert web.tokens[:n] == reference.tokens[:n]
            assert await wait_exit(coord, 15) == 0
        msgs = coord.messages()
        assert "ending 2 generation(s) still running after the grace" in msgs, msgs
        # On its way out the coordinator released the cut generations' sessions
        # (KV caches) on the targets, rather than leaving them to the idle timeout.
        for t in cluster.targets:
            async with grpc.aio.insecure_channel(t.address) as tch:
                stub = target_pb2_grpc.TargetServiceStub(tch)
                info = await stub.Info(target_pb2.TargetServiceInfoRequest(), timeout=5)
                assert info.counters.sessions == 0, (t.name, info.counters)
        async with grpc.aio.insecure_channel(cluster.drafter.address) as dch:
            dstub = drafter_pb2_grpc.DrafterServiceStub(dch)
            info = await dstub.Info(drafter_pb2.DrafterServiceInfoRequest(), timeout=5)
            assert info.counters.sessions == 0, info.counters


# --- a target --------------------------------------------------------------------------


@pytest.mark.parametrize("drain_delay", [0.0, 1.0])
async def test_target_sigterm_mid_generation_never_hangs(tmp_path: Path, drain_delay: float) -> None:
    """Verify-heavy DSI (lookahead 1, two replicas) and one target gets
    SIGTERM: the stream completes on the other replica; with a drain delay
    the target serves on, NOT_SERVING, until it stops."""
    with ExitStack() as stack:
        target_args = ("--grace", "5", "--drain-delay", str(drain_delay))
        cluster = start_cluster(stack, tmp_path, targets=2, target=target_args)
        victim = cluster.targets[1]
        async with (
            grpc.aio.insecure_channel(cluster.coordinator.address) as ch,
            grpc.aio.insecure_channel(victim.address) as tch,
        ):
            watched = await serving(tch)
            stream = generate(ch, request(300, lookahead=1))
            await until(lambda: len(stream.tokens) >= 10 or stream.task.done(), 20, "the first tokens")
            sent = victim.sigterm()
            if drain_delay:
                await until(lambda: len(watched.statuses) > 1, 5, "NOT_SERVING")
                check = await health_pb2_grpc.HealthStub(tch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status == NOT_SERVING  # still answering, but not serving
            await finished(stream, drain_delay + 30)
            await finished(watched, 5)
            assert [s for _, s in watched.statuses] == [SERVING, NOT_SERVING]
            assert watched.first(NOT_SERVING) < stream.ended
            assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
            assert stream.finish_reason == LENGTH and len(stream.tokens) == 300
            if drain_delay:
                # Served on through the drain delay: tokens kept coming after SIGTERM.
                assert stream.ended - sent >= drain_delay * 0.8, stream.ended - sent
                assert any(sent < t < sent + drain_delay for t in stream.arrivals)
            assert await wait_exit(victim, drain_delay + 10) == 0
            msgs = victim.messages()
            assert msgs.index("shutting down") < msgs.index("stopped") == len(msgs) - 1, msgs
            # The coordinator itself is unharmed.
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == SERVING and cluster.coordinator.popen.poll() is None


def test_a_call_dropped_by_a_stopping_server_is_unavailable() -> None:
    """A server that starts shutting down as a call reaches it drops the call
    with CANCELLED (a race the tests above hit now and then). The client did
    not cancel it (grpc.aio raises CancelledError for that), so dsi reports
    the peer as unavailable: the coordinator's client gets UNAVAILABLE naming
    the target, never a CANCELLED it did not ask for."""
    from dsi.wire.grpc_status import to_domain

    dropped = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "CANCELLED")
    err = to_domain(dropped, "target 127.0.0.1:50051")
    assert isinstance(err, errors.Unavailable)
    assert str(err) == "target 127.0.0.1:50051 is unavailable: CANCELLED"
