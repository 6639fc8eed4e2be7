"""Token trees (issue 13): a drafter proposes several candidates per position,
the target verifies the whole tree in one forward pass, and the output is
still exactly the target's, for SI and DSI, greedy and sampled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.backends.synthetic import PseudoLM, SyntheticDrafter, SyntheticSpec, SyntheticTarget
from dsi.domain import sampling
from dsi.domain.errors import InvalidArgument
from dsi.domain.types import ROOT, DraftRequest, DraftToken, SamplingParams, TreeShape, VerifyRequest
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy
from services.coordinator.engine.trees import Alternatives, StreamTree, verification_tree
from tests.helpers import make_engine
from tests.stats import assert_fits, exact_continuations
from tests.test_engine import synthetic_greedy_reference

SHAPES = [TreeShape(2, 1), TreeShape(3, 2), TreeShape(2, 4)]


async def run(engine: Engine, prompt: list[int], params: GenerationParams):
    gen = engine.generate(prompt, params)
    out = [t async for toks in gen.tokens() for t in toks]
    return out, gen


# --- the shape ---------------------------------------------------------------------------------


def test_tree_shape_parse_and_limits():
    assert TreeShape.parse("chain").is_chain and TreeShape.parse("1").is_chain
    assert TreeShape.parse("3x2") == TreeShape(3, 2) and TreeShape.parse("2") == TreeShape(2, 1)
    assert str(TreeShape(3, 2)) == "3x2" and TreeShape(3, 2).nodes_per_position == 5
    for bad in ("x", "3x", "axb", "17", "2x17"):
        with pytest.raises(InvalidArgument):
            TreeShape.parse(bad)
    assert TreeShape.create(0, 0) == TreeShape(1, 1), "0 on the wire means unset"


# --- the decision on a tree ----------------------------------------------------------------------


def test_verify_rows_follows_the_child_equal_to_the_targets_token():
    rng = np.random.default_rng(1)
    vocab, base, seed = 12, 20, 3
    for params in (SamplingParams(), SamplingParams(temperature=1.0)):
        for trial in range(30):
            # root -> {a, b}; a -> {c}; b -> {d, e}; e -> {f}
            parents = [ROOT, ROOT, 0, 1, 1, 4]
            tokens = [int(t) for t in rng.integers(0, vocab, size=6)]
            rows = rng.normal(size=(7, vocab))
            depth = {ROOT: 0}
            for i, p in enumerate(parents):
                depth[i] = depth[p] + 1
            target = {node: sampling.choose(rows[node + 1], params, seed + trial, base + depth[node]) for node in depth}
            drafts = [DraftToken(t, p) for t, p in zip(tokens, parents, strict=True)]
            decisions, path, nxt = sampling.verify_rows(rows, drafts, params, seed + trial, base)
            for i, d in enumerate(decisions):
                assert d.token_id == target[parents[i]] and d.accepted == (tokens[i] == target[parents[i]])
            node = ROOT
            for step in path:  # each step is the first child equal to the target's token
                children = [i for i, p in enumerate(parents) if p == node]
                assert step == next(i for i in children if tokens[i] == target[node])
                node = step
            assert all(tokens[i] != target[node] for i, p in enumerate(parents) if p == node), "the path stops"
            assert nxt == target[node]


def test_top_candidates_start_with_the_rules_choice_and_are_distinct():
    rng = np.random.default_rng(2)
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=5)):
        for seed in range(50):
            logits = rng.normal(size=20)
            cands = sampling.top_candidates(logits, params, seed, 7, 4)
            assert cands[0] == sampling.choose(logits, params, seed, 7)
            assert len(set(cands)) == len(cands) == 4
            if params.top_k:
                assert all(sampling.warp(logits, params)[c] > 0 for c in cands), "never an excluded token"
    assert sampling.top_candidates(np.array([0.0, -np.inf, 1.0]), SamplingParams(), 0, 0, 3) == [2, 0]


# --- stream trees and verification trees ------------------------------------------------------------


def test_stream_tree_reads_main_path_alternatives_and_branches():
    # main m0 (pos 5), its alternatives a0 (+ branch b0) and a1; main m1 (pos 6) with alternative a2
    nodes = [
        DraftToken(10, ROOT),  # 0 m0
        DraftToken(11, ROOT),  # 1 a0 at 5
        DraftToken(12, 1),  # 2 b0 at 6 (after a0)
        DraftToken(13, ROOT),  # 3 a1 at 5
        DraftToken(14, 0),  # 4 m1 at 6
        DraftToken(15, 0),  # 5 a2 at 6
    ]
    tree = StreamTree(5)
    got = [(p, t, None if b is None else list(b)) for p, t, b in tree.read(nodes)]
    assert [(p, t, b is None) for p, t, b in got] == [
        (5, 10, True),
        (5, 11, False),
        (6, 12, False),
        (5, 13, False),
        (6, 14, True),
        (6, 15, False),
    ]
    chain = [(p, t, b) for p, t, b in StreamTree(3).read([DraftToken(7), DraftToken(8)])]
    assert chain == [(3, 7, None), (4, 8, None)]


def test_verification_tree_puts_the_main_path_first_and_respects_the_budget():
    alts = Alternatives()
    alts.add(10, [21, 22])
    alts.add(10, [23])
    alts.add(11, [24, 25, 26])
    main = [DraftToken(1), DraftToken(2), DraftToken(3)]
    nodes, n_main = verification_tree(main, alts, 10, budget=64)
    assert n_main == 3
    assert [(n.token_id, n.parent) for n in nodes] == [
        (1, ROOT),
        (2, 0),
        (3, 1),
        (21, ROOT),
        (22, 3),
        (23, ROOT),
        (24, 0),
        (25, 6),
        (26, 7),
    ]
    small, n_main = verification_tree(main, alts, 10, budget=4)
    assert n_main == 3 and [n.token_id for n in small] == [1, 2, 3, 21], "main drafts first, then what fits"


# --- the target verifies a tree in one pass ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_hf_tree_forward_equals_per_path_recomputation_and_keeps_only_the_path(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    target = LocalTarget(load_target_model(str(tiny_models[arch])))
    model = target.model
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()

    def logits(seq: list[int]) -> np.ndarray:
        with torch.no_grad():
            return ref(torch.tensor([seq])).logits[0, -1].float().numpy()

    ctx = [5, 9, 3, 7, 11]
    tokens, parents = [4, 8, 12, 6, 20, 21], [ROOT, 0, 0, ROOT, 3, 1]
    state = model.new_state()
    await model.forward(state, [*ctx[:3], 1, 2], 1)  # a cache that shares 3 tokens with the context
    fwd = await model.forward_tree(state, ctx, tokens, parents)
    paths: list[list[int]] = []
    for t, p in zip(tokens, parents, strict=True):
        paths.append([*(paths[p] if p != ROOT else []), t])
    want = np.stack([logits(ctx), *(logits([*ctx, *p]) for p in paths)])
    assert np.allclose(fwd.rows, want, atol=1e-4), "each node sees the context and its ancestors only"
    assert (fwd.cached_tokens, fwd.computed_tokens) == (3, 2 + 6)
    await model.keep_path(state, ctx, [4, 8], [0, 1])
    after = await model.forward(state, [*ctx, 4, 8, 30], 2)
    assert after.cached_tokens == 6, "the kept path is reused"
    assert np.allclose(after.rows, np.stack([logits([*ctx, 4, 8]), logits([*ctx, 4, 8, 30])]), atol=1e-4)
    # Through LocalTarget: a tree request gives the path and leaves the session at context + path.
    t0 = int(np.argmax(logits(ctx)))
    t1 = int(np.argmax(logits([*ctx, t0])))
    drafts = [DraftToken((t0 + 1) % 64), DraftToken(t0, ROOT), DraftToken(t1, 1), DraftToken(3, 1)]
    res = await target.verify(VerifyRequest("s", ctx, drafts))
    assert res.path == [1, 2] and res.num_accepted == 2
    assert res.next_token == int(np.argmax(logits([*ctx, t0, t1])))


async def test_synthetic_tree_verification_costs_per_node_and_keeps_the_path():
    target = SyntheticTarget("synthetic:vocab=64,seed=2,tpot_ms=0,verify_token_ms=0")
    state = target.new_state()
    fwd = await target.forward_tree(state, [1, 2, 3], [4, 5, 6], [ROOT, 0, ROOT])
    lm = target.lm
    assert np.array_equal(fwd.rows[2], lm.logits([1, 2, 3, 4, 5])) and np.array_equal(
        fwd.rows[3], lm.logits([1, 2, 3, 6])
    )
    await target.keep_path(state, [1, 2, 3], [6], [2])
    assert state.seen == [1, 2, 3, 6]


# --- the drafter proposes a tree ---------------------------------------------------------------------


async def test_drafter_streams_main_path_alternatives_and_branches(tiny_models):
    from transformers import AutoModelForCausalLM

    path = str(tiny_models["llama-drafter"])
    drafter = LocalDrafter(load_drafter_model(path))
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    params = SamplingParams(temperature=0.9)
    ctx = [3, 1, 4, 1, 5]

    def logits(seq: list[int]) -> np.ndarray:
        with torch.no_grad():
            return ref(torch.tensor([seq])).logits[0, -1].float().numpy()

    req = DraftRequest("t", ctx, lookahead=2, max_tokens=4, sampling=params, seed=8, tree=TreeShape(3, 2))
    chunks = [c async for c in drafter.draft(req)]
    # main chunk (2 main tokens with 2 alternatives each), then the alternatives' branches, twice
    assert [len(c.tokens) for c in chunks] == [6, 4, 6, 4]
    assert [c.start_position for c in chunks] == [5, 6, 7, 8]
    nodes = [t for c in chunks for t in c.tokens]
    seq = list(ctx)
    main = [(p, t) for p, t, b in StreamTree(5).read(nodes) if b is None]
    assert [p for p, _ in main] == [5, 6, 7, 8]
    alternatives: dict[int, list[int]] = {}
    for position, token, branch in StreamTree(5).read(nodes):
        if branch is None:
            cands = sampling.top_candidates(logits(seq), params, 8, position, 3)
            assert token == cands[0]
            alternatives[position] = cands[1:]
            seq.append(token)
        elif len(branch) == 1:
            assert token == alternatives[position].pop(0), "the runners-up, in order"
        else:  # the best guess after the alternative
            before = seq[: position - 1]
            assert token == sampling.choose(logits([*before, branch[0]]), params, 8, position)


async def test_synthetic_drafter_ranks_the_targets_token_with_sibling_acceptance():
    spec = "synthetic:vocab=64,seed=4,acceptance=0.0,sibling_acceptance={}"
    for s in (0.0, 1.0):
        d = SyntheticDrafter(spec.format(s))
        t = SyntheticTarget(spec.format(s))
        state = d.new_state()
        for seed in range(20):
            ctx = [seed, 1, 2, 3]
            cands, _ = await d.next_candidates(state, ctx, SamplingParams(temperature=1.0), seed, 3)
            target = sampling.choose(t.lm.logits(ctx), SamplingParams(temperature=1.0), seed, len(ctx))
            assert len(set(cands)) == 3 and cands[0] != target
            assert (cands[1] == target) == (s == 1.0)


# --- the engine: lossless with trees -------------------------------------------------------------------


T_SPEC = "synthetic:vocab=500,seed=7,tpot_ms=2.5,jitter_ms=1"
D_SPEC = "synthetic:vocab=500,seed=7,tpot_ms=0.3,jitter_ms=0.3,acceptance=0.5,sibling_acceptance=0.6"


@pytest.mark.parametrize("replicas", [1, 4])
@pytest.mark.parametrize("strategy", [Strategy.SI, Strategy.DSI])
async def test_greedy_with_trees_equals_the_target_alone_synthetic(strategy, replicas):
    ref = synthetic_greedy_reference(SyntheticSpec.parse(T_SPEC), [1, 2, 3], 40)
    engine = make_engine(T_SPEC, D_SPEC, replicas)
    for shape in SHAPES:
        out, gen = await run(engine, [1, 2, 3], GenerationParams(40, strategy=strategy, lookahead=3, tree=shape))
        assert out == ref, f"{strategy.value} {shape} diverged"
        assert gen.stats.accepted_tokens <= gen.stats.decided_drafts
    for slot in engine.targets.slots:
        assert not slot.leases and len(slot.member.sessions) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_greedy_with_trees_equals_hf_generate(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    prompt = [17, 2, 40, 11, 8, 1]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = ref[0, len(prompt) :].tolist()
    for replicas in (1, 4):
        engine = make_engine(str(tiny_models[arch]), str(tiny_models[f"{arch}-drafter"]), replicas)
        for strategy in (Strategy.SI, Strategy.DSI):
            for shape in (TreeShape(3, 1), TreeShape(2, 3)):
                params = GenerationParams(20, strategy=strategy, lookahead=3, tree=shape)
                out, _ = await run(engine, prompt, params)
                assert out == ref, f"{arch} {strategy.value} {shape} with {replicas} replicas"


def test_trees_accept_more_per_pass_and_spare_drafting_rounds():
    """Drafter right 70% of the time with its first guess, and when wrong,
    80% of the time with its next one. SI with a tree needs fewer target
    passes for the same tokens; in DSI an alternative that turns out right
    becomes the pending speculation at once (its branch is drafted already),
    so fewer draft streams are restarted. On a virtual clock: deterministic."""
    t_spec = "synthetic:vocab=300,seed=3,ttft_ms=4,tpot_ms=4"
    d_spec = "synthetic:vocab=300,seed=3,ttft_ms=0.4,tpot_ms=0.4,acceptance=0.7,sibling_acceptance=0.8"
    ref = {s: synthetic_greedy_reference(SyntheticSpec.parse(t_spec), [5, 6, s], 60) for s in range(8)}

    async def totals(strategy: Strategy, shape: TreeShape) -> dict[str, int]:
        engine = make_engine(t_spec, d_spec, 1 if strategy is Strategy.SI else 2)
        tot = dict.fromkeys(("passes", "accepted", "alternatives", "streams"), 0)
        for s in range(8):
            out, gen = await run(engine, [5, 6, s], GenerationParams(60, strategy=strategy, lookahead=3, tree=shape))
            assert out == ref[s]
            st = gen.stats
            tot["passes"] += st.target_forward_passes
            tot["accepted"] += st.accepted_tokens
            tot["alternatives"] += st.alternative_hits
            tot["streams"] += st.draft_streams
        return tot

    for strategy in (Strategy.SI, Strategy.DSI):
        chain = run_virtual(totals(strategy, TreeShape()))
        tree = run_virtual(totals(strategy, TreeShape(2, 3)))
        assert chain["alternatives"] == 0 and tree["alternatives"] > 40, (strategy, tree)
        assert tree["accepted"] > chain["accepted"] + 40, (strategy, chain, tree)
        assert tree["streams"] < chain["streams"], (strategy, chain, tree)
        if strategy is Strategy.SI:
            assert tree["passes"] < 0.8 * chain["passes"], (chain, tree)


# --- sampling with trees -------------------------------------------------------------------------------

VOCAB, SEED, SUPPORT, EOS = 16, 0, 4, 9
EOS_PROMPT = [1, 2, 3]


def _exact(prompt: list[int], n: int, params: SamplingParams):
    lm = PseudoLM(VOCAB, SEED, SUPPORT)
    return exact_continuations(lambda seq: sampling.warp(lm.logits(seq), params), prompt, n, eos={EOS})


async def _sample(engine: Engine, prompt, params_for_seed, n: int):
    from collections import Counter

    counts: Counter = Counter()
    for seed in range(n):
        out, _ = await run(engine, prompt, params_for_seed(seed))
        counts[tuple(out)] += 1
    return counts


@pytest.mark.parametrize(
    ("strategy", "shape", "drafter_ms", "replicas"),
    [
        (Strategy.SI, TreeShape(3, 2), 2, 1),
        (Strategy.DSI, TreeShape(2, 1), 2, 2),
        (Strategy.DSI, TreeShape(3, 2), 1, 3),
        (Strategy.DSI, TreeShape(2, 3), 6, 2),
    ],
    ids=str,
)
def test_sampled_tree_output_follows_the_target_distribution(strategy, shape, drafter_ms, replicas):
    base = f"synthetic:vocab={VOCAB},seed={SEED},support={SUPPORT},eos={EOS}"
    t_spec = f"{base},ttft_ms=20,tpot_ms=20,verify_token_ms=1"
    d_spec = f"{base},ttft_ms={drafter_ms},tpot_ms={drafter_ms},acceptance=0.5,sibling_acceptance=0.5"
    engine = make_engine(t_spec, d_spec, replicas)
    params = SamplingParams(temperature=1.0)
    gp = lambda s: GenerationParams(3, params, seed=s, strategy=strategy, lookahead=3, tree=shape)  # noqa: E731
    counts = run_virtual(_sample(engine, EOS_PROMPT, gp, 1500))
    assert_fits(counts, _exact(EOS_PROMPT, 3, params), f"{strategy.value} tree {shape}")


def test_the_same_seed_gives_the_same_text_for_every_strategy_chain_and_tree():
    t_spec = "synthetic:vocab=200,seed=5,tpot_ms=2,jitter_ms=2"
    d_spec = "synthetic:vocab=200,seed=5,tpot_ms=0.4,jitter_ms=0.4,acceptance=0.6,sibling_acceptance=0.5"
    params = SamplingParams(temperature=1.0, top_k=20)

    async def all_runs():
        outs = {}
        for replicas in (1, 3):
            engine = make_engine(t_spec, d_spec, replicas)
            for strategy in Strategy:
                for shape in (TreeShape(), TreeShape(3, 2)):
                    gp = GenerationParams(30, params, seed=77, strategy=strategy, lookahead=4, tree=shape)
                    outs[(replicas, strategy, shape)], _ = await run(engine, [1, 2, 3], gp)
        return outs

    outs = run_virtual(all_runs())
    assert len({tuple(o) for o in outs.values()}) == 1, outs


async def test_a_tree_larger_than_the_targets_limit_is_cut_to_fit():
    """16 candidates per position with 16-token branches: far more nodes than a
    Verify may carry (64); verifications take the main path first and what
    fits, and the output is still exact."""
    with pytest.raises(InvalidArgument, match="tree width"):
        TreeShape.create(40, 1)
    spec = "synthetic:vocab=500,seed=1"
    engine = make_engine(spec, spec + ",acceptance=0.5,sibling_acceptance=0.3", 2)
    for strategy in (Strategy.SI, Strategy.DSI):
        params = GenerationParams(20, strategy=strategy, lookahead=4, tree=TreeShape(16, 16))
        out, _ = await run(engine, [1], params)
        assert out == synthetic_greedy_reference(SyntheticSpec.parse(spec), [1], 20)
