"""Faults injected into real processes (``python -m dsi ...``) in the middle
of generations: a target replica or the drafter killed (SIGKILL), stopped
(SIGSTOP) and restarted. No request is lost and no greedy token changes:

* a verification whose replica fails is issued again, with the same drafts,
  on another replica (``stats.failovers``); the failed replica gets no client
  request until its health probe (the Info RPC) answers again, and then it
  serves again;
* a drafter that fails leaves the generation to target-only steps
  (``stats.drafter_failures``, ``stats.tokens_without_drafter``) until it
  answers its health probe again; then speculation resumes.

Every process listens on 127.0.0.1 only, every wait is bounded, and every
process is killed when a test ends.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from dsi.v1 import generation_pb2, generation_pb2_grpc, target_pb2, target_pb2_grpc
from tests.procs import Cluster, Proc, finished, generate, spawn, start_cluster, until, wait_announced

LENGTH = generation_pb2.FINISH_REASON_LENGTH
STRATEGIES = {
    "nonsi": generation_pb2.STRATEGY_NONSI,
    "si": generation_pb2.STRATEGY_SI,
    "dsi": generation_pb2.STRATEGY_DSI,
}
#: Short deadlines so that a stopped process is noticed within a test's time.
COORDINATOR = ("--draft-timeout", "1")
#: 8 ms per target forward pass; a 1 ms drafter whose tokens are accepted 70% of the time.
TARGET_SPEC = "synthetic:vocab=1000,seed=3,tpot_ms=8"
DRAFTER_SPEC = "synthetic:vocab=1000,seed=3,tpot_ms=1,acceptance=0.7"
MODELS = (TARGET_SPEC, DRAFTER_SPEC)


def req(strategy: str, tokens: int = 200, prompt: tuple[int, ...] = (1, 2, 3, 4)) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt_token_ids=list(prompt), max_new_tokens=tokens, strategy=STRATEGIES[strategy], lookahead=3
    )


async def run(
    ch: grpc.aio.Channel, request: generation_pb2.GenerateRequest
) -> tuple[list[int], generation_pb2.GenerationStats]:
    """One generation to its end; its tokens and stats."""
    stream = generate(ch, request)
    await finished(stream, 60)
    assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
    assert stream.finish_reason == LENGTH and stream.stats is not None
    return stream.tokens, stream.stats


async def info(ch: grpc.aio.Channel) -> generation_pb2.GetInfoResponse:
    return await generation_pb2_grpc.GenerationServiceStub(ch).GetInfo(generation_pb2.GetInfoRequest(), timeout=5)


def restart(stack: ExitStack, tmp: Path, p: Proc, *args: str) -> Proc:
    """Start ``p`` again on its address (the coordinator knows it by that)."""
    port = int(p.address.rsplit(":", 1)[1])
    again = spawn(stack, tmp, p.name, *args, port=port)
    wait_announced(again)
    assert again.address == p.address
    return again


async def target_requests(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await target_pb2_grpc.TargetServiceStub(ch).Info(target_pb2.TargetServiceInfoRequest(), timeout=5)
        return resp.counters.requests


async def busy_target(ch: grpc.aio.Channel, cluster: Cluster) -> Proc:
    """A target replica with a verification in flight now (bounded poll)."""
    for _ in range(2000):
        for i, r in enumerate((await info(ch)).targets):
            if r.in_flight:
                return cluster.targets[i]
        await asyncio.sleep(0.002)
    raise AssertionError("no verification was seen in flight")


@pytest.mark.parametrize("strategy", ["si", "dsi"])
async def test_sigkill_of_a_target_replica_mid_generation_loses_nothing(tmp_path: Path, strategy: str) -> None:
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, targets=2, coordinator=COORDINATOR, models=MODELS)
        async with grpc.aio.insecure_channel(cluster.coordinator.address) as ch:
            ref, _ = await run(ch, req("nonsi"))
            stream = generate(ch, req(strategy))
            await until(lambda: len(stream.tokens) >= 20, 30, "the first tokens")
            victim = await busy_target(ch, cluster)
            victim.popen.kill()
            await finished(stream, 60)
            assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
            assert stream.tokens == ref
            assert stream.stats is not None and stream.stats.failovers >= 1
            # The dead replica costs no later request.
            for name in ("dsi", "nonsi"):
                ids, stats = await run(ch, req(name))
                assert ids == ref and stats.failovers == 0, name
            index = cluster.targets.index(victim)
            assert not (await info(ch)).targets[index].available
            # Restarted, it answers its health probe and serves again.
            restart(stack, tmp_path, victim, "target", "--model", TARGET_SPEC)

            async def back() -> bool:
                return (await info(ch)).targets[index].available

            await until(back, 20, "the restarted replica back in service")
            for _ in range(3):
                ids, stats = await run(ch, req("dsi"))
                assert ids == ref and stats.failovers == 0
            assert await target_requests(victim.address) > 0


async def test_a_stopped_target_replica_is_passed_over_and_taken_back_when_it_answers(tmp_path: Path) -> None:
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, targets=2, coordinator=COORDINATOR, models=MODELS)
        async with grpc.aio.insecure_channel(cluster.coordinator.address) as ch:
            ref, _ = await run(ch, req("nonsi", 300))
            stream = generate(ch, req("dsi", 300))
            await until(lambda: len(stream.tokens) >= 20, 30, "the first tokens")
            victim = await busy_target(ch, cluster)
            victim.popen.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:
                await finished(stream, 60)
                assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
                assert stream.tokens == ref
                assert stream.stats is not None and stream.stats.failovers >= 1
                index = cluster.targets.index(victim)
                assert not (await info(ch)).targets[index].available
            finally:
                victim.popen.send_signal(signal.SIGCONT)

            async def back() -> bool:
                return (await info(ch)).targets[index].available

            await until(back, 20, "the resumed replica back in service")
            ids, stats = await run(ch, req("dsi", 300))
            assert ids == ref and stats.failovers == 0


@pytest.mark.parametrize(("strategy", "sig"), [("si", signal.SIGKILL), ("dsi", signal.SIGSTOP)])
async def test_a_failed_drafter_degrades_to_target_only_steps_then_speculation_resumes(
    tmp_path: Path, strategy: str, sig: signal.Signals
) -> None:
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, targets=2, coordinator=COORDINATOR, models=MODELS)
        drafter = cluster.drafter
        async with grpc.aio.insecure_channel(cluster.coordinator.address) as ch:
            ref, _ = await run(ch, req("nonsi", 300))
            stream = generate(ch, req(strategy, 300))
            await until(lambda: len(stream.tokens) >= 20, 30, "the first tokens")
            drafter.popen.send_signal(sig)
            try:
                await finished(stream, 60)
                assert stream.code == grpc.StatusCode.OK, (stream.code, stream.details)
                assert stream.tokens == ref
                st = stream.stats
                assert st is not None and st.drafter_failures == 1 and 0 < st.tokens_without_drafter < 300
                assert st.accepted_tokens > 0  # it speculated before the failure
                ids, st = await run(ch, req(strategy, 50))  # while it is down: target-only, correct
                assert ids == ref[:50] and st.tokens_without_drafter == 50 and st.drafter_failures == 0
            finally:
                if sig == signal.SIGSTOP:
                    drafter.popen.send_signal(signal.SIGCONT)
            if sig == signal.SIGKILL:
                restart(stack, tmp_path, drafter, "drafter", "--model", DRAFTER_SPEC)

            async def back() -> bool:
                return (await info(ch)).drafters[0].available

            await until(back, 20, "the drafter back in service")
            ids, st = await run(ch, req(strategy, 100))
            assert ids == ref[:100] and st.tokens_without_drafter == 0 and st.accepted_tokens > 0


async def test_a_replica_killed_during_a_burst_of_generations_loses_none(tmp_path: Path) -> None:
    prompts = [(1, 2, 3, i) for i in range(8)]
    with ExitStack() as stack:
        cluster = start_cluster(stack, tmp_path, targets=3, coordinator=COORDINATOR, models=MODELS)
        async with grpc.aio.insecure_channel(cluster.coordinator.address) as ch:
            refs = await asyncio.gather(*(run(ch, req("nonsi", 150, p)) for p in prompts))
            streams = [generate(ch, req(("dsi", "si", "nonsi")[i % 3], 150, p)) for i, p in enumerate(prompts)]
            await until(lambda: sum(len(s.tokens) for s in streams) >= 200, 30, "the first tokens")
            cluster.targets[0].popen.kill()
            for s in streams:
                await finished(s, 60)
            for s, (ref, _) in zip(streams, refs, strict=True):
                assert s.code == grpc.StatusCode.OK, (s.code, s.details)
                assert s.tokens == ref
            assert sum(s.stats.failovers for s in streams if s.stats is not None) >= 1
