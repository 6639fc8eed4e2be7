"""Failover in the engine, in-process: target replicas and drafters that
fail, hang or refuse work mid-generation. The output is the one without
faults, token for token, greedy and seeded sampling alike (a position's token
depends only on the seed, the position and the target's distribution there),
for every strategy. The real processes are killed in tests/test_faults.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.types import DraftChunk, DraftRequest, SamplingParams, ServiceInfo, VerifyRequest, VerifyResult
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator import pool as pool_module
from services.coordinator.engine import Engine, GenerationParams, Strategy
from services.coordinator.engine import generation as generation_module

T = "synthetic:vocab=300,seed=5,tpot_ms=1"
D = "synthetic:vocab=300,seed=5,tpot_ms=0,acceptance=0.7"
PROMPT = [1, 2, 3]
GREEDY = SamplingParams.create(0.0, 0.0, 0)
SAMPLED = SamplingParams.create(1.0, 0.0, 0)


class Faulty(Target):
    """A target replica that fails calls ``fail_from`` .. (all after, unless
    ``recovers_after`` calls have failed) in the way ``mode`` says."""

    def __init__(self, inner: LocalTarget, mode: str = "down", fail_from: int = 10**9) -> None:
        self.inner, self.mode, self.fail_from = inner, mode, fail_from
        self.name = f"faulty {mode}"
        self.calls = self.info_calls = 0
        self.healthy_info = True

    async def info(self) -> ServiceInfo:
        self.info_calls += 1
        if not self.healthy_info:
            raise Unavailable(f"{self.name} is unavailable: probe refused")
        return await self.inner.info()

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        self.calls += 1
        if self.calls >= self.fail_from:
            if self.mode == "down":
                raise Unavailable(f"{self.name} is unavailable: connection refused")
            if self.mode == "full":
                raise ResourceExhausted(f"{self.name}: too many sessions")
            await asyncio.sleep(3600)  # "hang": alive, silent
        return await self.inner.verify(request)

    async def release_session(self, session_id: str) -> bool:
        return await self.inner.release_session(session_id)


class FaultyDrafter(Drafter):
    """A drafter whose streams fail (or go silent) from the ``fail_from``-th on."""

    def __init__(self, inner: LocalDrafter, mode: str = "down", fail_from: int = 10**9) -> None:
        self.inner, self.mode, self.fail_from = inner, mode, fail_from
        self.name = f"faulty drafter {mode}"
        self.streams = 0

    async def info(self) -> ServiceInfo:
        raise Unavailable(f"{self.name} is unavailable")  # stays down once it failed

    async def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        self.streams += 1
        failing = self.streams >= self.fail_from
        async for chunk in self.inner.draft(request):
            if failing:
                if self.mode == "down":
                    raise Unavailable(f"{self.name} is unavailable: stream broken")
                await asyncio.sleep(3600)
            yield chunk

    async def release_session(self, session_id: str) -> bool:
        return await self.inner.release_session(session_id)


def engine(targets: list[Target], drafters: list[Drafter] | None = None, **kw) -> Engine:
    info = load_target_model(T).info
    if drafters is None:
        drafters = [LocalDrafter(load_drafter_model(D))]
    return Engine(targets, drafters, max_context=info.max_context_tokens, vocab_size=info.vocab_size, **kw)


def local(spec: str = T) -> LocalTarget:
    return LocalTarget(load_target_model(spec))


async def generate(eng: Engine, strategy: Strategy, sampling: SamplingParams, tokens: int = 60):
    params = GenerationParams(max_new_tokens=tokens, sampling=sampling, seed=1234, strategy=strategy, lookahead=3)
    gen = eng.generate(PROMPT, params)
    out: list[int] = []
    async for toks in gen.tokens():
        out.extend(toks)
    return out, gen.stats


@pytest.fixture(autouse=True)
def fast_probes_and_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "PROBE_FIRST", 0.01)
    monkeypatch.setattr(generation_module, "DEADLINE_FLOOR", 1.0)  # loose enough for a loaded machine


@pytest.mark.parametrize(
    ("mode", "sampling"),
    [("down", GREEDY), ("down", SAMPLED), ("hang", SAMPLED)],
    ids=["down-greedy", "down-sampled", "hang-sampled"],
)
@pytest.mark.parametrize("strategy", list(Strategy))
async def test_a_failing_replica_changes_no_token(mode: str, strategy: Strategy, sampling: SamplingParams) -> None:
    ref, _ = await generate(engine([local()]), strategy, sampling)
    # DSI: from its first call (its generation's first frontier step, which nothing can make stale);
    # the sequential strategies stay on it: from its 4th.
    fail_from = 1 if strategy is Strategy.DSI else 4
    faulty = Faulty(local(), mode, fail_from)
    faulty.healthy_info = False  # it stays down
    # A hung call is given up after its deadline: 10x the replica's latency, at least DEADLINE_FLOOR, at most this.
    eng = engine([faulty, local(), local()], verify_timeout=2.0)
    if strategy is not Strategy.DSI:  # sequential strategies stay on one replica: make it the faulty one
        eng.targets.slots[1].leases.add(pool_module.Lease(1, lambda: 0))
        eng.targets.slots[2].leases.add(pool_module.Lease(2, lambda: 0))
    out, stats = await generate(eng, strategy, sampling)
    assert out == ref and faulty.calls >= fail_from
    if strategy is Strategy.DSI and mode == "hang":
        # DSI need not wait for it: the other replicas may decide its span first (then it is cancelled).
        assert stats.failovers >= 1 or eng.targets.is_active(0)
        await eng.close()
        return
    assert stats.failovers >= 1
    assert not eng.targets.is_active(0)
    for slot in eng.targets.slots:
        slot.leases.clear()
    calls = faulty.calls
    out, stats = await generate(eng, Strategy.DSI, sampling)  # a replica that is down gets no request
    assert out == ref and stats.failovers == 0 and faulty.calls == calls
    await eng.close()


async def test_a_replica_back_after_its_probe_answers_gets_work_again() -> None:
    faulty = Faulty(local(), "down", fail_from=3)
    faulty.healthy_info = False
    eng = engine([faulty, local()])
    ref, _ = await generate(engine([local()]), Strategy.DSI, GREEDY)
    out, _ = await generate(eng, Strategy.DSI, GREEDY)
    assert out == ref and not eng.targets.is_active(0)
    probes = faulty.info_calls
    for _ in range(500):  # bounded: the back-off doubles from PROBE_FIRST
        if faulty.info_calls > probes:
            break
        await asyncio.sleep(0.01)
    assert faulty.info_calls > probes and not eng.targets.is_active(0)  # probed while down, still down
    faulty.fail_from, faulty.healthy_info = 10**9, True
    for _ in range(300):
        if eng.targets.is_active(0):
            break
        await asyncio.sleep(0.01)
    assert eng.targets.is_active(0)
    calls = faulty.calls
    out, _ = await generate(eng, Strategy.DSI, GREEDY)
    assert out == ref and faulty.calls > calls
    await eng.close()


async def test_saturated_replicas_are_retried_a_bounded_number_of_times_then_the_error_is_raised() -> None:
    replicas = [Faulty(local(), "full", fail_from=1) for _ in range(2)]
    eng = engine(list(replicas))
    with pytest.raises(ResourceExhausted, match="too many sessions"):
        await generate(eng, Strategy.DSI, GREEDY)
    assert sum(r.calls for r in replicas) == 2 * len(replicas) + 1
    assert all(eng.targets.is_active(i) for i in range(2))  # saturated is not down
    await eng.close()


async def test_the_clients_deadline_bounds_every_call() -> None:
    eng = engine([Faulty(local(), "hang", fail_from=1)], verify_timeout=60.0)
    gen = eng.generate(PROMPT, GenerationParams(max_new_tokens=5, strategy=Strategy.NONSI))
    gen.deadline = asyncio.get_running_loop().time() + 0.3
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DeadlineExceeded):
        async for _ in gen.tokens():
            pass
    assert loop.time() - started < 5.0  # not the 60 s verify timeout
    assert eng.targets.is_active(0)  # the client's deadline is not the replica's fault


@pytest.mark.parametrize("mode", ["down", "hang"])
@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_a_failing_drafter_leaves_target_only_steps(mode: str, strategy: Strategy, sampling: SamplingParams):
    ref, _ = await generate(engine([local()]), Strategy.NONSI, sampling)
    drafter = FaultyDrafter(LocalDrafter(load_drafter_model(D)), mode, fail_from=3)
    slow = T.replace("tpot_ms=1", "tpot_ms=10")  # the same model, slower: the drafter's silence is noticed
    eng = engine([local(slow), local(slow)], [drafter], draft_timeout=0.3)
    out, stats = await generate(eng, strategy, sampling)
    assert out == ref
    assert stats.drafter_failures == 1 and 0 < stats.tokens_without_drafter < 60 and stats.accepted_tokens > 0
    assert not eng.drafters.is_active(0)
    await eng.close()


async def test_drafter_instances_of_one_model_fail_over_to_each_other() -> None:
    broken = FaultyDrafter(LocalDrafter(load_drafter_model(D)), "down", fail_from=2)
    spare = LocalDrafter(load_drafter_model(D))
    eng = engine([local(), local()], [broken, spare])
    eng.drafter_models = {0: "d", 1: "d"}  # the same model: replicas of each other
    eng.drafters.slots[1].leases.add(pool_module.Lease(1, lambda: 0))  # the generation takes the broken one first
    ref, _ = await generate(engine([local()]), Strategy.NONSI, GREEDY)
    out, stats = await generate(eng, Strategy.SI, GREEDY)
    assert out == ref and stats.drafter_failures == 1
    assert stats.tokens_without_drafter <= 1  # the next step drafts on the spare
    assert stats.drafters[0].accepted > 0
    await eng.close()


@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
def test_a_long_prompt_is_given_the_time_its_prefill_takes(strategy: Strategy) -> None:
    """A verification's deadline grows with the tokens its replica has not
    cached (a prompt it has not seen): a 3000-token prompt's first pass (3 s
    here) on a replica measured at 10 ms per verification is not a hang
    (10 x 10 ms, floor 1 s, would give it up; it was, and the request failed
    with the replica marked down). On the virtual clock: no real waiting."""
    slow_prefill = "synthetic:vocab=300,seed=5,tpot_ms=10,prefill_token_ms=1"

    async def run() -> tuple[list[int], list[int], int]:
        eng = engine([local(slow_prefill)], verify_timeout=60.0)
        await generate(eng, strategy, GREEDY, tokens=10)  # the replica's latency: 10 ms
        assert eng.targets.latency(0) == pytest.approx(0.010, rel=0.5)
        prompt = [1 + i % 299 for i in range(3000)]
        params = GenerationParams(max_new_tokens=8, seed=1234, strategy=strategy, lookahead=3)
        gen = eng.generate(prompt, params)
        out = [t async for toks in gen.tokens() for t in toks]
        ref_gen = engine([local(T)]).generate(prompt, replace(params, strategy=Strategy.NONSI))
        ref = [t async for toks in ref_gen.tokens() for t in toks]
        failovers = gen.stats.failovers
        # and the replica's latency learns from it per PREFILL_BLOCK tokens (3 s as one pass: 0.6 s)
        assert eng.targets.latency(0) < 0.05
        await eng.close()
        return out, ref, failovers

    out, ref, failovers = run_virtual(run())
    assert out == ref and len(out) == 8 and failovers == 0


class Stalling(Target):
    """A target whose ``stall_at``-th verification holds the whole event loop
    for ``seconds`` (as a garbage collection or a starved CPU would)."""

    def __init__(self, inner: LocalTarget, stall_at: int, seconds: float) -> None:
        self.inner, self.stall_at, self.seconds, self.calls = inner, stall_at, seconds, 0
        self.name = "stalling target"

    async def info(self) -> ServiceInfo:
        return await self.inner.info()

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        self.calls += 1
        if self.calls == self.stall_at:
            time.sleep(self.seconds)  # noqa: ASYNC251 - the point: nothing else runs meanwhile
        return await self.inner.verify(request)

    async def release_session(self, session_id: str) -> bool:
        return await self.inner.release_session(session_id)


@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
async def test_a_stalled_coordinator_does_not_take_a_healthy_drafter_for_silent(strategy: Strategy) -> None:
    """The coordinator's own event loop held up for longer than the draft
    timeout (a GC pause, a starved CPU) is not the drafter's silence: it
    gets its time again, and nothing counts as a drafter failure. (A local
    full test run once saw a 0.5 s stall drop a healthy drafter.)"""
    ref, _ = await generate(engine([local()]), Strategy.NONSI, GREEDY)
    slow = T.replace("tpot_ms=1", "tpot_ms=10")
    targets = [Stalling(local(slow), stall_at=3, seconds=0.6), local(slow)]
    eng = engine(list(targets), draft_timeout=0.3)
    out, stats = await generate(eng, strategy, GREEDY)
    assert targets[0].calls >= 3, "the stall happened"
    assert out == ref and stats.drafter_failures == 0 and stats.tokens_without_drafter == 0
    await eng.close()
