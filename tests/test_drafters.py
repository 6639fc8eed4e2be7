"""Several drafters in one generation (issue 14): their guesses merge into one
token tree, each drafter's part is accounted for, a drafter that contributes
nothing is dropped, and the output is still exactly the target's."""

from __future__ import annotations

import pytest

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.backends.synthetic import PseudoLM, SyntheticSpec
from dsi.domain import sampling
from dsi.domain.types import DraftToken, SamplingParams, TreeShape
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy
from services.coordinator.engine.drafters import DROP_AFTER, DrafterSlot, DrafterStats, Proposal
from services.coordinator.engine.trees import Alternatives, verification_tree
from tests.stats import assert_fits, exact_continuations
from tests.test_engine import synthetic_greedy_reference

T_SPEC = "synthetic:vocab=400,seed=7,ttft_ms=4,tpot_ms=4"


def drafter_spec(acceptance: float, coin_seed: int, ms: float = 0.5) -> str:
    return f"synthetic:vocab=400,seed=7,ttft_ms={ms},tpot_ms={ms},acceptance={acceptance},coin_seed={coin_seed}"


def engine_with(drafter_specs: list[str], replicas: int) -> Engine:
    targets = [LocalTarget(load_target_model(T_SPEC)) for _ in range(replicas)]
    drafters = [LocalDrafter(load_drafter_model(s)) for s in drafter_specs]
    engine = Engine(targets, drafters, max_context=8192, vocab_size=400)
    for i, s in enumerate(drafter_specs):  # what the coordinator sets from each drafter's Info
        engine.drafter_models[i] = s
    return engine


async def run(engine: Engine, prompt: list[int], params: GenerationParams):
    gen = engine.generate(prompt, params)
    out = [t async for toks in gen.tokens() for t in toks]
    return out, gen


def test_a_proposal_joins_the_tree_where_it_leaves_the_main_path():
    slot = DrafterSlot(1, "b", None, None, DrafterStats("b"))
    main = [DraftToken(t) for t in (1, 2, 3)]
    context = [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]  # positions 0..9; the verification's base is 10
    agrees = Proposal(slot, 10, [1, 2, 7, 8])  # leaves the main path at position 12
    ahead = Proposal(slot, 13, [5, 6])  # starts after the main path: continues it
    wrong_before = Proposal(slot, 8, [4, 4, 1])  # assumed other tokens at 8, 9
    nodes, n_main = verification_tree(main, Alternatives(), 10, 64, [agrees, ahead, wrong_before], context)
    assert n_main == 3
    assert [(n.token_id, n.parent) for n in nodes] == [(1, -1), (2, 0), (3, 1), (7, 1), (8, 3), (5, 2), (6, 5)]
    nodes, _ = verification_tree(main, Alternatives(), 10, 5, [agrees, ahead], context)
    assert len(nodes) == 5, "the budget holds"


@pytest.mark.parametrize("replicas", [1, 4])
@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
def test_greedy_with_two_drafters_equals_the_target_alone(strategy, replicas):
    ref = {p: synthetic_greedy_reference(SyntheticSpec.parse(T_SPEC), [p, 2, 3], 50) for p in range(4)}

    async def go():
        engine = engine_with([drafter_spec(0.6, 1), drafter_spec(0.6, 2, ms=0.3)], replicas)
        stats = []
        for p in range(4):
            for tree in (TreeShape(), TreeShape(2, 2)):
                out, gen = await run(engine, [p, 2, 3], GenerationParams(50, strategy=strategy, lookahead=3, tree=tree))
                assert out == ref[p], (strategy, replicas, p, tree)
                stats.append(gen.stats)
        for slot in engine.targets.slots:
            assert not slot.leases and len(slot.member.sessions) == 0
        for slot in engine.drafters.slots:
            assert not slot.leases and len(slot.member.sessions) == 0
        return stats

    stats = run_virtual(go())
    assert all(len(s.drafters) == 2 for s in stats)
    unique = sum(s.drafters[1].unique for s in stats)
    assert unique > 0, "an independent second drafter is right where the first is wrong"
    assert all(s.drafters[1].accepted <= s.drafters[1].decided for s in stats)


def test_two_drafters_accept_more_per_pass_than_either_alone():
    a, b = drafter_spec(0.6, 1), drafter_spec(0.6, 2)

    async def tokens_per_pass(specs: list[str]) -> float:
        engine = engine_with(specs, 1)
        new = passes = 0
        for p in range(6):
            _, gen = await run(engine, [p, 5, 5], GenerationParams(60, strategy=Strategy.SI, lookahead=4))
            new += gen.stats.new_tokens
            passes += gen.stats.target_forward_passes
        return new / passes

    alone_a = run_virtual(tokens_per_pass([a]))
    alone_b = run_virtual(tokens_per_pass([b]))
    both = run_virtual(tokens_per_pass([a, b]))
    assert both > 1.1 * max(alone_a, alone_b), (alone_a, alone_b, both)


def test_a_drafter_that_contributes_nothing_is_dropped():
    """The second drafter is right exactly where the first is (same coins):
    it never contributes a unique token and is dropped after DROP_AFTER."""

    async def go():
        engine = engine_with([drafter_spec(0.7, 1), drafter_spec(0.7, 1, ms=0.4)], 2)
        out, gen = await run(engine, [1, 2, 3], GenerationParams(400, strategy=Strategy.DSI, lookahead=3))
        return out, gen.stats

    out, st = run_virtual(go())
    assert out == synthetic_greedy_reference(SyntheticSpec.parse(T_SPEC), [1, 2, 3], 400)
    second = st.drafters[1]
    assert second.unique == 0 and second.dropped and second.decided >= DROP_AFTER
    assert not st.drafters[0].dropped, "the primary is never dropped"


def test_replicas_of_one_drafter_model_share_the_work_instead():
    spec = drafter_spec(0.6, 1)

    async def go():
        engine = engine_with([spec, spec], 2)
        _, gen = await run(engine, [1, 2, 3], GenerationParams(20, strategy=Strategy.DSI, lookahead=3))
        return gen.stats

    st = run_virtual(go())
    assert len(st.drafters) == 1


@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
def test_sampled_output_with_two_drafters_follows_the_target_distribution(strategy):
    vocab, seed, support, eos = 16, 0, 4, 9
    base = f"synthetic:vocab={vocab},seed={seed},support={support},eos={eos}"
    t_spec = f"{base},ttft_ms=20,tpot_ms=20,verify_token_ms=1"
    specs = [f"{base},ttft_ms=5,tpot_ms=5,acceptance=0.6,coin_seed=1", f"{base},ttft_ms=2,tpot_ms=2,acceptance=0.5"]
    params = SamplingParams(temperature=1.0)

    async def go():
        targets = [LocalTarget(load_target_model(t_spec)) for _ in range(2)]
        engine = Engine(targets, [LocalDrafter(load_drafter_model(s)) for s in specs], max_context=64, vocab_size=16)
        engine.eos = frozenset({eos})
        engine.drafter_models.update({0: specs[0], 1: specs[1]})
        from collections import Counter

        counts: Counter = Counter()
        for s in range(1500):
            out, _ = await run(engine, [1, 2, 3], GenerationParams(3, params, seed=s, strategy=strategy, lookahead=3))
            counts[tuple(out)] += 1
        return counts

    counts = run_virtual(go())
    lm = PseudoLM(vocab, seed, support)
    exact = exact_continuations(lambda seq: sampling.warp(lm.logits(seq), params), [1, 2, 3], 3, eos={eos})
    assert_fits(counts, exact, f"{strategy.value} with two drafters")
