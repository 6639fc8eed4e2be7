"""Automatic lookahead (services/coordinator/engine/lookahead.py): its model
against the event-by-event simulator of ``dsi simulate``, and in the engine:
lossless, and following a drafter whose acceptance changes along the text."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import pytest

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain.interfaces import Drafter
from dsi.domain.types import DraftChunk, DraftRequest, SamplingParams, ServiceInfo
from dsi.tools.experiments.simulate import Node, SimConfig, expected_tokens_per_si_round, simulate_one
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy
from services.coordinator.engine.lookahead import (
    GRID,
    LARGEST,
    START,
    AcceptanceEstimate,
    LookaheadPlanner,
    best_lookahead,
    dsi_seconds_per_token,
    robust_lookahead,
    si_seconds_per_token,
)


def test_si_cost_is_the_simulators_round_arithmetic():
    for a in (0.1, 0.5, 0.9):
        for k in (1, 3, 8):
            tokens = expected_tokens_per_si_round(a, k)
            assert si_seconds_per_token(a, 0.002, 0.03, k) == pytest.approx((k * 0.002 + 0.03) / tokens)


def test_choices_follow_acceptance_and_speeds():
    # SI: a better drafter earns longer chunks; a useless one the shortest.
    assert best_lookahead(False, 0.95, 0.001, 0.03, 1) > best_lookahead(False, 0.6, 0.001, 0.03, 1) > 1
    assert best_lookahead(False, 0.05, 0.001, 0.03, 1) == 1
    # DSI: chunks long enough that the replicas are not all busy before the next chunk is drafted.
    assert best_lookahead(True, 0.8, 0.002, 0.03, 2) > best_lookahead(True, 0.8, 0.002, 0.03, 8)
    # Never slower than non-SI by the model.
    assert dsi_seconds_per_token(0.0, 0.01, 0.03, 4, 2) <= 0.03


def _simulated_ms(cfg: SimConfig, strategy: str, coins: list[np.ndarray]) -> float:
    return float(np.mean([simulate_one(cfg, c, [strategy])[strategy].latency_ms for c in coins]))


@pytest.mark.parametrize("strategy", ["si", "dsi"])
@pytest.mark.parametrize(
    ("acceptance", "drafter_ms", "replicas"),
    [(0.9, 1.0, 4), (0.7, 3.0, 4), (0.5, 1.0, 2), (0.8, 6.0, 8), (0.3, 2.0, 4)],
)
def test_the_choice_is_near_the_best_fixed_lookahead_in_the_simulator(strategy, acceptance, drafter_ms, replicas):
    target = Node(ttft_ms=30.0, tpot_ms=30.0)
    base = SimConfig(tuple([target] * replicas), Node(drafter_ms, drafter_ms), acceptance, 1, tokens=300)
    rng = np.random.default_rng(0)
    coins = [rng.random(base.tokens + 64) < acceptance for _ in range(6)]
    fixed = {k: _simulated_ms(replace(base, lookahead=k), strategy, coins) for k in range(1, 13)}
    chosen = best_lookahead(strategy == "dsi", acceptance, drafter_ms / 1000, 0.030, replicas, 12)
    assert fixed[chosen] <= min(fixed.values()) * 1.05, (chosen, fixed)


def test_the_planner_tracks_what_it_measures():
    p = LookaheadPlanner(False, lambda: (0.030, 1))
    assert p.lookahead == START  # nothing timed yet
    for _ in range(200):
        p.decided(True)
    p.drafted(10, 0.010)
    high = p.lookahead
    for _ in range(200):
        p.decided(False)
    assert high >= 8 and p.lookahead <= 2


def test_a_planner_builds_its_model_again_only_when_its_measurements_move(monkeypatch):
    """The model's table is built again when a measurement moves it by more
    than TABLE_TOLERANCE, and a choice made again when a draft was decided
    or REPLAN_TIMINGS timings came without one (each timing did: 2-3 plans a
    token); the choice is what the model built afresh gives."""
    import services.coordinator.engine.lookahead as la

    builds = []
    build = la.CostTable.build.__func__

    def counted(cls, *args, **kwargs):
        builds.append(args)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(la.CostTable, "build", classmethod(counted))
    p = LookaheadPlanner(True, lambda: (0.030, 4))
    rng = np.random.default_rng(5)
    p.drafted(4, 0.013, first=True)
    p.drafted(4, 0.012)
    for coin in rng.random(100) < 0.8:
        p.decided(bool(coin))
    p.verified(5, 0.030)
    k, weights = p.lookahead, p.estimate.weights()
    assert len(builds) == 1 and p.estimate.weights() is weights  # the same until the next draft
    for _ in range(5):  # a verification line that moves by less than 1%
        p.verified(5, 0.0301)
        assert p.lookahead == k
    assert len(builds) == 1
    p.drafted(4, 0.004)  # the drafter got much faster: taken up at the next decided draft or timings later
    assert p.lookahead == k and len(builds) == 1  # 6 timings since the choice, no draft decided
    p.drafted(4, 0.004)
    p.drafted(4, 0.004)  # the REPLAN_TIMINGS-th: built again when the lookahead is read
    chosen = p.lookahead
    assert len(builds) == 2
    start, d = p.drafting
    base, per_token = p.verification.fit()
    t = base + per_token * (np.arange(LARGEST + 1) + 1.0)
    assert chosen == robust_lookahead(True, p.estimate.weights(), d, t, 4, LARGEST, start)
    p.verified(5, 0.0301)
    p.decided(True)  # a decided draft: chosen again at once
    assert p.estimate.weights() is not weights
    again = p.lookahead
    base, per_token = p.verification.fit()
    t = base + per_token * (np.arange(LARGEST + 1) + 1.0)
    assert again == robust_lookahead(True, p.estimate.weights(), d, t, 4, LARGEST, start)


def test_streams_of_one_length_tell_the_start_from_the_drafts_by_the_drafters_own_time():
    """SI streams deliver their drafts in one chunk; while the lookahead
    stays at 1, every stream has one length and the line through zero counts
    a stream's start as drafting (the demo pair: 6-7 ms per draft against
    2-3 computed, and the choice stayed at 1). The drafter's own computing
    time per chunk splits them."""
    blind, told = LookaheadPlanner(False, lambda: (0.010, 1)), LookaheadPlanner(False, lambda: (0.010, 1))
    for _ in range(20):
        blind.drafted(1, 0.006, first=True)
        told.drafted(1, 0.006, first=True, computing=0.002)
    assert blind.drafting == pytest.approx((0.0, 0.006))
    assert told.drafting == pytest.approx((0.004, 0.002))
    for p in (blind, told):
        for _ in range(64):
            p.decided(True)
            p.decided(True)
            p.decided(True)
            p.decided(False)
    assert blind.lookahead < told.lookahead


def test_the_acceptance_estimate_follows_a_change_within_a_few_drafts():
    est = AcceptanceEstimate()
    rng = np.random.default_rng(1)
    for coin in rng.random(200) < 0.8:
        est.add(bool(coin))
    assert est.mean() == pytest.approx(0.8, abs=0.1)
    steady = est.weights()
    assert steady @ GRID == pytest.approx(est.mean(), abs=1e-3)
    # Steady text: the estimate rests on many drafts (a narrow posterior).
    assert steady[GRID < 0.6].sum() < 0.05
    for _ in range(6):  # the text turns hard: six rejections in a row
        est.add(False)
    assert est.mean() < 0.4
    assert est.weights()[GRID < 0.4].sum() > 0.5


def test_dsi_where_no_lookahead_pays_keeps_one_for_text_that_may_come():
    """Text the drafter cannot guess (acceptance 0.1): the frontier steps set
    DSI's pace whatever the lookahead; it takes the one that is best over
    every acceptance (2 with a drafter 10x faster than the target), not the
    one that gains most on this text (1), and 1 where drafting is as slow as
    a verification (nothing is gained at any acceptance) or where each draft
    costs the target time (the event simulator and the engine: 2 replicas at
    30 ms + 3 ms per draft, acceptance 0.1: 28.9 ms per token with 1 draft,
    29.2 with 2, 33.3 with 8)."""
    hard = np.where(np.isclose(GRID, 0.1125), 1.0, 0.0)
    assert robust_lookahead(True, hard, 0.003, 0.030, 3) == 2
    assert robust_lookahead(True, hard, 0.030, 0.030, 3) == 1
    # A compute-bound target (3 ms more per draft verified): a longer chunk holds a replica for nothing.
    per_drafts = 0.030 + 0.003 * np.arange(LARGEST + 1)
    assert robust_lookahead(True, hard, 0.001, per_drafts, 2) == 1
    assert robust_lookahead(True, hard, 0.003, per_drafts, 3) == 1
    # Text where drafts pay: the choice for that text.
    easy = np.where(np.isclose(GRID, 0.9125), 1.0, 0.0)
    assert robust_lookahead(True, easy, 0.003, 0.030, 3) == best_lookahead(True, 0.9125, 0.003, 0.030, 3)


T = "synthetic:vocab=300,seed=9,tpot_ms=6"
#: Easy and hard text in turns of 48 positions.
D_CHANGING = "synthetic:vocab=300,seed=9,tpot_ms=1,acceptance=0.95,hard_acceptance=0.1,block=48"


def _engine(drafter: str, replicas: int) -> Engine:
    targets = [LocalTarget(load_target_model(T)) for _ in range(replicas)]
    info = targets[0].model.info
    return Engine(
        targets,
        [LocalDrafter(load_drafter_model(drafter))],
        max_context=info.max_context_tokens,
        vocab_size=info.vocab_size,
    )


@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_auto_lookahead_is_lossless_and_follows_the_text(strategy: Strategy, temperature: float):
    sampling = SamplingParams.create(temperature, 0.0, 0)
    ref_gen = _engine(D_CHANGING, 1).generate([1, 2], GenerationParams(200, sampling, 77, Strategy.NONSI))
    ref = [t async for chunk in ref_gen.tokens() for t in chunk]
    eng = _engine(D_CHANGING, 3)
    gen = eng.generate([1, 2], GenerationParams(200, sampling, 77, strategy, lookahead=0))
    assert gen.planner is not None
    chosen: list[int] = []
    out: list[int] = []
    async for chunk in gen.tokens():
        out += chunk
        chosen.append(gen.lookahead)
    assert out == ref
    # Easy blocks earn longer chunks than hard ones.
    assert max(chosen) >= 3 and min(chosen) <= 2, chosen


async def _grid_ms_per_token(drafter_ms: float, acceptance: float, strategy: Strategy, k: int) -> float:
    """A cell of docs/benchmarks.md's section-5 grid on the virtual clock (as tools/lookahead_bench.py
    --grid): 4 replicas at 20 ms, 64 tokens; one warm-up generation, then two measured."""
    target = "synthetic:vocab=32000,seed=1,ttft_ms=20,tpot_ms=20"
    drafter = f"synthetic:vocab=32000,seed=1,ttft_ms={drafter_ms},tpot_ms={drafter_ms},acceptance={acceptance}"
    targets = [LocalTarget(load_target_model(target)) for _ in range(4)]
    engine = Engine(targets, [LocalDrafter(load_drafter_model(drafter))], max_context=8192, vocab_size=32000)
    loop = asyncio.get_running_loop()
    seconds = 0.0
    for prompt in ([0, 2, 3], [1, 2, 3], [2, 2, 3]):
        start = loop.time()
        async for _ in engine.generate(prompt, GenerationParams(64, strategy=strategy, lookahead=k)).tokens():
            pass
        if prompt[0]:
            seconds += loop.time() - start
    return seconds * 1000 / (2 * 64)


@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
@pytest.mark.slow
@pytest.mark.parametrize(("drafter_ms", "acceptance"), [(0.2, 0.794), (4.16, 0.598), (12.08, 0.01)])
def test_auto_is_within_5_percent_of_the_best_fixed_lookahead_on_grid_cells(strategy, drafter_ms, acceptance):
    async def go() -> tuple[dict[int, float], float]:
        fixed = {k: await _grid_ms_per_token(drafter_ms, acceptance, strategy, k) for k in (1, 2, 3, 5, 8)}
        return fixed, await _grid_ms_per_token(drafter_ms, acceptance, strategy, 0)

    fixed, auto = run_virtual(go())
    assert auto <= 1.05 * min(fixed.values()), (auto, fixed)


def test_lines_separate_a_streams_start_from_its_drafts_and_a_verifications_base_from_its_tokens():
    p = LookaheadPlanner(False, lambda: (0.0, 1))
    assert p.drafting == (0.0, 0.0) and p.lookahead == START  # nothing timed yet
    rng = np.random.default_rng(2)
    for _ in range(60):  # SI's streams: all their drafts in one chunk, 3 ms to start, 2 ms a draft
        k = int(rng.integers(1, 7))
        p.drafted(k, 0.003 + 0.002 * k + rng.normal(0, 0.0002), first=True)
        p.verified(k + 1, 0.008 + 0.0005 * (k + 1) + rng.normal(0, 0.0002))
    start, d = p.drafting
    assert start == pytest.approx(0.003, abs=0.0005) and d == pytest.approx(0.002, abs=0.0002)
    assert p.verification.fit() == pytest.approx((0.008, 0.0005), abs=0.0003)
    # A stream's chunks after its first time the drafts on their own; its start is what the first took beyond.
    p.drafted(4, 0.004)
    start, d = p.drafting
    assert d == pytest.approx(0.001) and start == pytest.approx(0.003 + 0.002 * 3.5 - 0.001 * 3.5, abs=0.001)
    # Samples of one size: a verification's line is flat at their mean, a stream's through zero.
    q = LookaheadPlanner(False, lambda: (0.0, 1))
    for _ in range(5):
        q.drafted(3, 0.009, first=True)
        q.verified(4, 0.010)
    assert q.drafting == pytest.approx((0.0, 0.003)) and q.verification.fit() == pytest.approx((0.010, 0.0))


def test_si_pays_a_streams_start_every_round_so_its_chunks_grow_with_it():
    no_start = best_lookahead(False, 0.9, 0.002, 0.010, 1)
    assert best_lookahead(False, 0.9, 0.002, 0.010, 1, start=0.010) > no_start
    # and a verification that costs more with every draft (a CPU) shortens them
    per_draft = 0.010 + 0.002 * (np.arange(LARGEST + 1) + 1.0)  # 0..LARGEST drafts
    assert best_lookahead(False, 0.9, 0.002, per_draft, 1) < no_start


class _SlowToStart(Drafter):
    """A drafter whose streams start ``delay`` seconds late (a call's round trip and a prefill)."""

    def __init__(self, inner: LocalDrafter, delay: float) -> None:
        self.inner, self.delay, self.name = inner, delay, "slow to start"

    async def info(self) -> ServiceInfo:
        return await self.inner.info()

    async def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        await asyncio.sleep(self.delay)
        async for chunk in self.inner.draft(request):
            yield chunk

    async def release_session(self, session_id: str) -> bool:
        return await self.inner.release_session(session_id)


def test_si_auto_measures_its_streams_start_drafts_and_verifications_through_the_engine():
    """On the virtual clock: a drafter 1 ms per draft whose streams start
    4 ms late, a target 6 ms per pass plus 1 ms per draft; SI delivers a
    stream's drafts in one chunk, so only lines over streams of different
    lengths tell the start from the drafts."""
    target = "synthetic:vocab=300,seed=9,ttft_ms=6,tpot_ms=6,verify_token_ms=1"
    drafter = "synthetic:vocab=300,seed=9,ttft_ms=1,tpot_ms=1,acceptance=0.8"

    async def go() -> LookaheadPlanner:
        t = LocalTarget(load_target_model(target))
        d = _SlowToStart(LocalDrafter(load_drafter_model(drafter)), 0.004)
        eng = Engine([t], [d], max_context=t.model.info.max_context_tokens, vocab_size=t.model.info.vocab_size)
        for prompt in ([1, 2], [3, 4]):
            gen = eng.generate(prompt, GenerationParams(200, strategy=Strategy.SI, lookahead=0))
            async for _ in gen.tokens():
                pass
        assert gen.planner is not None
        return gen.planner

    planner = run_virtual(go())
    start, d = planner.drafting
    assert start == pytest.approx(0.004, abs=0.001) and d == pytest.approx(0.001, abs=0.0002)
    base, per_token = planner.verification.fit()  # k drafts: 6 + k ms over k + 1 tokens
    assert per_token == pytest.approx(0.001, abs=0.0002) and base == pytest.approx(0.005, abs=0.001)


def test_the_estimate_follows_changes_as_far_as_changes_have_predicted_the_text():
    """Text whose acceptance changes in blocks: the change-point model
    predicts it far better than one acceptance for all, and gets the weight.
    Text without changes (independent coins): one rejection is no news, and
    moves the estimate little (the change-point model alone moved 0.9 to 0.8)."""
    rng = np.random.default_rng(3)
    blocks = AcceptanceEstimate()
    for i in range(400):
        blocks.add(bool(rng.random() < (0.95 if (i // 48) % 2 == 0 else 0.1)))
    assert blocks.changing > 0.99
    steady = AcceptanceEstimate()
    for coin in rng.random(400) < 0.88:
        steady.add(bool(coin))
    assert steady.changing < 0.5
    before = steady.mean()
    steady.add(False)
    assert 0 < before - steady.mean() < 0.04
    assert steady.weights() @ GRID == pytest.approx(steady.mean(), abs=1e-3)


def test_a_long_prompts_prefill_does_not_bend_the_verification_line():
    """A 2000-token prompt prefilled at 0.5 ms a token (1 s) is one sample far
    out on the line of a verification's seconds by its tokens; fitted in, it
    would tilt the line for chunks of a few drafts. It is left out."""
    target = "synthetic:vocab=300,seed=9,ttft_ms=6,tpot_ms=6,verify_token_ms=1,prefill_token_ms=0.5"
    drafter = "synthetic:vocab=300,seed=9,ttft_ms=1,tpot_ms=1,acceptance=0.8"

    async def go() -> LookaheadPlanner:
        t = LocalTarget(load_target_model(target))
        eng = Engine([t], [LocalDrafter(load_drafter_model(drafter))], max_context=8192, vocab_size=300)
        gen = eng.generate([1 + i % 299 for i in range(2000)], GenerationParams(100, strategy=Strategy.SI, lookahead=0))
        async for _ in gen.tokens():
            pass
        assert gen.planner is not None
        return gen.planner

    base, per_token = run_virtual(go()).verification.fit()
    assert per_token == pytest.approx(0.001, abs=0.0003) and base == pytest.approx(0.005, abs=0.0015)


def test_a_verification_queued_behind_a_cancelled_pass_is_timed_from_its_own_pass():
    """DSI at acceptance 0.5 with a fast drafter: chunks often go to a replica
    still running a cancelled chunk's pass (it runs to its end), and wait for
    it. Those chunks are the long ones, and the waits (up to a pass) once
    fitted a slope of 1.5-2.5 ms per draft to a target whose passes are
    30 ms whatever they carry, and made the planner choose 2-3 where 6-16 are
    best. The wait is the replica's (``queue_seconds``), not the chunk's."""
    target = "synthetic:vocab=300,seed=4,ttft_ms=30,tpot_ms=30"
    drafter = "synthetic:vocab=300,seed=4,tpot_ms=0.3,acceptance=0.5"

    async def go() -> LookaheadPlanner:
        ts = [LocalTarget(load_target_model(target)) for _ in range(3)]
        eng = Engine(ts, [LocalDrafter(load_drafter_model(drafter))], max_context=8192, vocab_size=300)
        gen = eng.generate([1, 2, 3], GenerationParams(200, strategy=Strategy.DSI, lookahead=0))
        async for _ in gen.tokens():
            pass
        assert gen.planner is not None and gen.stats.verifications_cancelled > 10
        return gen.planner

    planner = run_virtual(go())
    base, per_token = planner.verification.fit()
    assert per_token == pytest.approx(0.0, abs=1e-5) and base == pytest.approx(0.030, abs=1e-4)
    assert planner.lookahead >= 5


def test_dsi_takes_long_chunks_where_the_first_one_waits_for_a_replica_anyway():
    """A drafter at 1% of the target, acceptance 0.5, 3 replicas: after a
    restart the first chunk waits for a replica (the others run cancelled
    chunks' passes to their end) longer than 16 drafts take, so in the event
    simulator long chunks cost nothing here, and they pay as soon as the text
    turns easy. Counting only the drafts' time, the model chose 6."""
    from tools.lookahead_vs_simulator import compare

    cell = compare("dsi", 0.3, 0.5, 3, tokens=150, draws=4)
    assert cell.chosen >= 12 and cell.ratio <= 1.005, cell
    assert cell.ms_per_token[15] <= cell.ms_per_token[5], cell


def test_the_closed_form_chooses_near_the_simulators_best_across_cells():
    """tools/lookahead_vs_simulator.py (docs/benchmarks.md, "Automatic
    lookahead"): the planner's choice at a known acceptance, against the event
    simulator's fastest lookahead on the same draws, in cells where the
    drafter's speed and the replicas pull the best lookahead apart. Two
    replicas and easy text are where a wide tie (``NEAR`` 1%) chose chunks
    twice too long: 5% slower."""
    from tools.lookahead_vs_simulator import compare

    cells = [
        compare(strategy, drafter_ms, acceptance, replicas, tokens=150, draws=4)
        for strategy in ("si", "dsi")
        for drafter_ms, acceptance, replicas in ((0.3, 0.9, 3), (3.0, 0.99, 2), (6.0, 0.95, 2), (6.0, 0.7, 4))
    ]
    for c in cells:
        assert len(c.ms_per_token) == 16 and c.ms_per_token[c.best - 1] == min(c.ms_per_token)
        assert c.ratio <= 1.03, c
    assert len({c.best for c in cells if c.strategy == "dsi"}) >= 3, "the cells must want different lookaheads"


async def test_dsi_plans_as_si_where_the_drafter_shares_its_targets_device() -> None:
    """Models (backend "hf") that report one host and one device share it:
    drafting and verifying take turns there, so DSI's automatic lookahead is
    planned with SI's model; anything else (another host or device, a
    synthetic model, no drafter, a drafter that left) keeps DSI's own."""
    from services.coordinator.coordinator import DRAFTER, Coordinator, Peer

    async def peer(make, spec: str, host: str, device: str, backend: str = "hf") -> Peer:
        client = make(spec)
        info = await client.info()
        return Peer(client, spec, replace(info, model=replace(info.model, backend=backend, host=host, device=device)))

    def target(host: str = "node-a", device: str = "cpu", backend: str = "hf") -> Peer:
        return peer(lambda s: LocalTarget(load_target_model(s)), "synthetic:vocab=64", host, device, backend)

    def drafter(host: str = "node-a", device: str = "cpu", backend: str = "hf") -> Peer:
        return peer(lambda s: LocalDrafter(load_drafter_model(s)), "synthetic:vocab=64", host, device, backend)

    cases = [
        ([target(), target()], [drafter()], True),
        ([target(device="cuda:0")], [drafter(device="cuda:0")], True),
        ([target(), target(host="node-b")], [drafter()], False),
        ([target(device="cuda:0")], [drafter(device="cuda:1")], False),
        ([target()], [drafter(backend="synthetic")], False),
        ([target(host="")], [drafter(host="")], False),
        ([target()], [], False),
    ]
    for targets, drafters, shared in cases:
        coordinator = Coordinator([await t for t in targets], [await d for d in drafters])
        assert coordinator.engine.shared_device is shared
        if not drafters:
            continue
        gen = coordinator.engine.generate([1, 2], GenerationParams(4, strategy=Strategy.DSI, lookahead=0))
        assert gen.planner is not None and gen.planner.dsi is not shared
        si = coordinator.engine.generate([1, 2], GenerationParams(4, strategy=Strategy.SI, lookahead=0))
        assert si.planner is not None and not si.planner.dsi
        coordinator.remove_peer(DRAFTER, 0)
        assert not coordinator.engine.shared_device


def test_the_estimates_counts_kept_draft_by_draft_are_those_of_its_history():
    """The accepted drafts among the last r, for every r, are kept as drafts
    come (not summed over the history again at each: a Python-level pass over
    256 drafts per decided draft), also once the oldest drafts leave."""
    from services.coordinator.engine.lookahead import MAX_RUN, AcceptanceEstimate

    e = AcceptanceEstimate()
    rng = np.random.default_rng(3)
    for i, coin in enumerate(rng.random(MAX_RUN + 40) < 0.6):
        e.add(bool(coin))
        if i % 37 == 0 or i >= MAX_RUN:
            recent = np.array(list(reversed(e.history)), dtype=float)
            acc, dec = e._counts()
            assert np.array_equal(acc, np.concatenate(([0.0], np.cumsum(recent))))
            assert np.array_equal(dec, np.arange(len(recent) + 1, dtype=float))
    assert np.array_equal(e.copy()._counts()[0], e._counts()[0])
