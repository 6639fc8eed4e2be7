"""The synthetic backend (dsi/backends/synthetic.py): spec parsing, the
deterministic pseudo LM, the configured acceptance rate of the synthetic
drafter/target pair (measured through LocalDrafter/LocalTarget), and latency.

Latency tests assert lower bounds only, never upper bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import numpy as np
import pytest

from dsi.backends import load_drafter_model, load_target_model
from dsi.backends.base import LocalDrafter, LocalTarget
from dsi.backends.synthetic import PseudoLM, SyntheticDrafter, SyntheticSpec, SyntheticTarget
from dsi.domain.errors import InvalidArgument
from dsi.domain.sampling import choose, warp
from dsi.domain.types import GREEDY, DraftRequest, DraftToken, SamplingParams, VerifyRequest

# ---------------------------------------------------------------------------
# SyntheticSpec.parse
# ---------------------------------------------------------------------------


def test_parse_defaults() -> None:
    for spec in ("synthetic", "synthetic:", "synthetic: , ,"):
        got = SyntheticSpec.parse(spec)
        assert got == SyntheticSpec(), f"{spec!r} must give the defaults"
    d = SyntheticSpec()
    assert (d.vocab, d.seed, d.acceptance, d.max_context, d.support, d.eos) == (32000, 0, 0.8, 8192, 8, -1)
    assert d.ttft_ms == d.tpot_ms == d.verify_token_ms == d.prefill_token_ms == d.jitter_ms == 0.0


def test_parse_every_key() -> None:
    spec = (
        "synthetic:vocab=500,seed=7,ttft_ms=12.5,tpot_ms=3,acceptance=0.25,verify_token_ms=0.5,"
        "prefill_token_ms=0.125,max_context=1024,support=4,eos=2,jitter_ms=1.5,sibling_acceptance=0.75,coin_seed=9,"
        "batch_slope=0.05,hard_acceptance=0.5,block=32"
    )
    got = SyntheticSpec.parse(spec)
    want = SyntheticSpec(
        vocab=500,
        seed=7,
        ttft_ms=12.5,
        tpot_ms=3.0,
        acceptance=0.25,
        verify_token_ms=0.5,
        prefill_token_ms=0.125,
        max_context=1024,
        support=4,
        eos=2,
        jitter_ms=1.5,
        sibling_acceptance=0.75,
        coin_seed=9,
        batch_slope=0.05,
        hard_acceptance=0.5,
        block=32,
    )
    assert got == want
    assert (got.acceptance_at(31), got.acceptance_at(32), got.acceptance_at(64)) == (0.25, 0.5, 0.25)
    keys = {item.partition("=")[0] for item in spec.partition(":")[2].split(",")}
    assert keys == {f.name for f in dataclasses.fields(SyntheticSpec)}, "the spec above must name every key"
    for f in dataclasses.fields(SyntheticSpec):
        assert isinstance(getattr(got, f.name), int if f.type == "int" else float), f"{f.name} has the wrong type"


def test_parse_tolerates_whitespace_and_later_keys_win() -> None:
    got = SyntheticSpec.parse("synthetic: vocab = 100 , seed=1, seed=2")
    assert got.vocab == 100 and got.seed == 2


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("synth:vocab=10", "not a synthetic model spec"),
        ("hf:vocab=10", "not a synthetic model spec"),
        ("synthetic:colour=red", "known keys: vocab, seed"),
        ("synthetic:vocab", "bad synthetic spec item 'vocab'"),
        ("synthetic:vocab=abc", "vocab must be an integer, got 'abc'"),
        ("synthetic:vocab=1.5", "vocab must be an integer"),
        ("synthetic:tpot_ms=fast", "tpot_ms must be a number"),
        ("synthetic:acceptance=", "acceptance must be a number"),
        ("synthetic:acceptance=1.01", "acceptance must lie in"),
        ("synthetic:acceptance=-0.1", "acceptance must lie in"),
        ("synthetic:acceptance=nan", "acceptance must lie in"),
        ("synthetic:ttft_ms=-1", "latencies must be finite numbers >= 0"),
        ("synthetic:tpot_ms=-1", "latencies must be finite numbers >= 0"),
        ("synthetic:verify_token_ms=-1", "latencies must be finite numbers >= 0"),
        ("synthetic:prefill_token_ms=-0.5", "latencies must be finite numbers >= 0"),
        ("synthetic:jitter_ms=-2", "latencies must be finite numbers >= 0"),
        ("synthetic:support=0", "support >= 1"),
        ("synthetic:vocab=15,support=8", "vocab >= 2 \\* support"),
        ("synthetic:max_context=1", "max_context must be >= 2"),
        ("synthetic:vocab=100,eos=100", "eos must be < vocab"),
    ],
)
def test_parse_errors(spec: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        SyntheticSpec.parse(spec)


def test_parse_rejects_non_finite_latencies() -> None:
    accepted = []
    for key in ("ttft_ms", "tpot_ms", "verify_token_ms", "prefill_token_ms", "jitter_ms"):
        for value in ("nan", "inf"):
            try:
                SyntheticSpec.parse(f"synthetic:{key}={value}")
            except InvalidArgument:
                continue
            accepted.append(f"{key}={value}")
    assert not accepted, f"non-finite latencies must be rejected, accepted: {accepted}"


def test_boundary_values_are_accepted() -> None:
    s = SyntheticSpec.parse("synthetic:vocab=16,support=8,acceptance=0,max_context=2,eos=15")
    assert (s.vocab, s.support, s.acceptance, s.max_context, s.eos) == (16, 8, 0.0, 2, 15)
    assert SyntheticSpec.parse("synthetic:acceptance=1").acceptance == 1.0


def test_model_info() -> None:
    t = SyntheticTarget("synthetic:vocab=100,eos=3,max_context=50")
    d = SyntheticDrafter("synthetic:vocab=100,acceptance=0.2")
    other = SyntheticTarget("synthetic:vocab=101")
    assert t.info.vocab_size == 100 and t.info.eos_token_ids == (3,) and t.info.max_context_tokens == 50
    assert d.info.eos_token_ids == (), "eos=-1 means none"
    assert t.info.backend == "synthetic" and t.info.model_id == "synthetic:vocab=100,eos=3,max_context=50"
    assert t.info.tokenizer_fingerprint == d.info.tokenizer_fingerprint, "same vocab: a compatible pair"
    assert t.info.tokenizer_fingerprint != other.info.tokenizer_fingerprint
    assert isinstance(load_target_model("synthetic:vocab=100"), SyntheticTarget)
    assert isinstance(load_drafter_model("synthetic"), SyntheticDrafter)


# ---------------------------------------------------------------------------
# The pseudo LM
# ---------------------------------------------------------------------------


def test_pseudo_lm_is_deterministic_and_seeded() -> None:
    a, b = PseudoLM(200, 3, 8), PseudoLM(200, 3, 8)
    other_seed = PseudoLM(200, 4, 8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ctx = rng.integers(0, 200, size=int(rng.integers(1, 12))).tolist()
        la = a.logits(ctx)
        assert np.array_equal(la, a.logits(ctx)), "same instance, same context: same logits"
        assert np.array_equal(la, b.logits(ctx)), "same spec, same context: same logits"
        assert not np.array_equal(la, other_seed.logits(ctx)), "the seed must matter"
        finite = np.isfinite(la)
        assert finite.sum() == 8, "exactly `support` tokens have non-zero probability"
        assert math.isclose(np.exp(la[finite]).sum(), 1.0, rel_tol=1e-9), "logits are log-probabilities"


@pytest.mark.parametrize(
    "params",
    [GREEDY, SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=3), SamplingParams(0.7, 0.9)],
)
def test_pseudo_lm_choose_is_the_rule_on_its_logits(params: SamplingParams) -> None:
    """The drafter's guess from the support alone (choose_sparse) is the
    token the decision rule picks from the dense row."""
    lm = PseudoLM(32000, 2, 8)
    rng = np.random.default_rng(1)
    for i in range(40):
        ctx = rng.integers(0, 32000, size=int(rng.integers(1, 12))).tolist()
        assert lm.choose(ctx, params, 11 + i) == choose(lm.logits(ctx), params, 11 + i, len(ctx))


def test_drafter_coins_share_the_models_draws_only_when_their_seeds_agree() -> None:
    same = SyntheticDrafter("synthetic:vocab=64,seed=5")
    assert same.coins is same.lm, "one draw per position serves the guesses and the coins"
    other = SyntheticDrafter("synthetic:vocab=64,seed=5,coin_seed=6")
    assert other.coins is not other.lm and other.coins.seed == 6


def test_pseudo_lm_looks_at_length_and_last_four_tokens() -> None:
    lm = PseudoLM(200, 0, 8)
    base = lm.logits([1, 2, 3, 4, 5, 6])
    assert np.array_equal(base, lm.logits([9, 9, 3, 4, 5, 6])), "tokens before the window do not matter"
    assert not np.array_equal(base, lm.logits([1, 2, 3, 4, 5, 7])), "the last token matters"
    assert not np.array_equal(base, lm.logits([1, 2, 9, 4, 5, 6])), "the 4th-last token matters"
    assert not np.array_equal(base, lm.logits([0, 1, 2, 3, 4, 5, 6])), "the length matters"
    assert not np.array_equal(base, lm.logits([2, 3, 4, 5, 6])), "the length matters"


async def test_target_rows_are_the_pseudo_lm_of_each_prefix() -> None:
    t = SyntheticTarget("synthetic:vocab=64,seed=5")
    tokens = [3, 1, 4, 1, 5, 9, 2]
    fwd = await t.forward(t.new_state(), tokens, 3)
    assert fwd.rows.shape == (3, 64)
    for i in range(3):
        prefix = tokens[: len(tokens) - 3 + 1 + i]
        assert np.array_equal(fwd.rows[i], t.lm.logits(prefix)), f"row {i} must follow {prefix}"


@pytest.mark.parametrize("a", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3), SamplingParams(1.2, top_p=0.8)],
    ids=str,
)
async def test_drafter_guesses_the_targets_token_or_one_it_never_chooses(a: float, params: SamplingParams) -> None:
    """The drafter's scores single out one token: the target's own choice there
    (same rule, same seed) when the context's coin says so, else a token
    outside the target's support; so a draft is accepted exactly when the coin
    (probability ``a``) says so."""
    d = SyntheticDrafter(f"synthetic:vocab=64,seed=1,acceptance={a}")
    state = d.new_state()
    rng = np.random.default_rng(1)
    right = 0
    for trial in range(40):
        ctx = rng.integers(0, 64, size=6).tolist()
        scores, _ = await d.next_scores(state, ctx, params, seed=trial)
        assert np.isfinite(scores).sum() == 1
        guess = int(np.argmax(scores))
        assert choose(scores, params, trial, len(ctx)) == guess, "every rule picks the one finite score"
        target = choose(d.lm.logits(ctx), params, trial, len(ctx))
        coin = d.lm.draw(ctx)[4]
        if coin < a:
            assert guess == target
            right += 1
        else:
            assert warp(d.lm.logits(ctx), params)[guess] == 0, "a wrong guess is a token the target never chooses"
    if a in (0.0, 1.0):
        assert right == 40 * a


# ---------------------------------------------------------------------------
# Measured acceptance through LocalDrafter / LocalTarget
# ---------------------------------------------------------------------------

VOCAB = 64


def _contexts(n: int, seed: int) -> list[list[int]]:
    """``n`` random contexts whose (length, last 4 tokens) keys are distinct,
    so the pseudo LM's draws for them are independent."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < n:
        ctx = rng.integers(0, VOCAB, size=int(rng.integers(4, 12))).tolist()
        key = (len(ctx), *ctx[-4:])
        if key not in seen:
            seen.add(key)
            out.append(ctx)
    return out


async def _measure(a: float, params: SamplingParams, n: int, lookahead: int = 1) -> list[int]:
    """Draft ``lookahead`` tokens and verify them, ``n`` times; the numbers of
    accepted tokens. Every trial has its own context and seed."""
    spec = f"synthetic:vocab={VOCAB},seed=11,acceptance={a}"
    target = LocalTarget(SyntheticTarget(spec))
    drafter = LocalDrafter(SyntheticDrafter(spec))
    accepted = []
    for trial, ctx in enumerate(_contexts(n, seed=int(a * 1000) + lookahead)):
        seed = 10_000 + trial  # fixed (seed, position) would reuse the same uniforms in every trial
        req = DraftRequest("s", ctx, lookahead=lookahead, max_tokens=lookahead, sampling=params, seed=seed)
        drafts = [tok async for chunk in drafter.draft(req) for tok in chunk.tokens]
        assert len(drafts) == lookahead
        res = await target.verify(VerifyRequest("s", ctx, drafts, params, seed))
        assert len(res.decisions) == lookahead
        accepted.append(res.num_accepted)
    return accepted


ACCEPT_PARAMS = [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3)]


@pytest.mark.parametrize("params", ACCEPT_PARAMS, ids=["greedy", "t1", "t0.7-top3"])
@pytest.mark.parametrize("a", [0.0, 0.3, 0.8, 1.0])
async def test_measured_acceptance_matches_the_spec(a: float, params: SamplingParams) -> None:
    n = 300 if a in (0.0, 1.0) else 1200
    accepted = await _measure(a, params, n)
    hits = sum(accepted)
    if a in (0.0, 1.0):
        assert hits == a * n, f"acceptance {a} must be exact: {hits}/{n} accepted ({params})"
        return
    se = math.sqrt(a * (1 - a) / n)
    rate = hits / n
    assert abs(rate - a) <= 4.5 * se, f"{params}: measured {rate:.4f}, configured {a} +- {4.5 * se:.4f}"


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0)], ids=["greedy", "t1"])
async def test_acceptance_is_independent_per_token(params: SamplingParams) -> None:
    """With a chunk of 4 drafts the accepted run length is geometric:
    P(k accepted) = a^k (1 - a) for k < 4, a^4 for k = 4."""
    a, m, n = 0.6, 4, 700
    accepted = await _measure(a, params, n, lookahead=m)
    counts = np.bincount(accepted, minlength=m + 1)
    probs = np.array([a**k * (1 - a) for k in range(m)] + [a**m])
    expected = n * probs
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 18.467, f"{params}: run lengths {counts.tolist()} vs expected {np.round(expected, 1).tolist()}"


# ---------------------------------------------------------------------------
# Latency (lower bounds only)
# ---------------------------------------------------------------------------

SLACK = 0.002  # timer granularity


async def test_target_latency_ttft_then_tpot_plus_verify_tokens() -> None:
    target = LocalTarget(SyntheticTarget("synthetic:vocab=64,ttft_ms=40,tpot_ms=20,verify_token_ms=10"))
    first = await target.verify(VerifyRequest("a", [1, 2, 3], drafts=[], sampling=GREEDY))
    assert first.stats.compute_seconds >= 0.040 - SLACK, f"first forward {first.stats.compute_seconds:.4f}s < ttft"
    drafts = [DraftToken(5), DraftToken(6), DraftToken(7)]
    second = await target.verify(VerifyRequest("a", [1, 2, 3, 4], drafts=drafts))
    assert second.stats.compute_seconds >= 0.020 + 3 * 0.010 - SLACK, "later forward: tpot + 3 * verify_token_ms"
    other = await target.verify(VerifyRequest("b", [1, 2, 3], drafts=[DraftToken(1)]))
    assert other.stats.compute_seconds >= 0.040 + 0.010 - SLACK, "a new session pays ttft again"


async def test_target_latency_prefill_of_unseen_tokens() -> None:
    target = LocalTarget(SyntheticTarget("synthetic:vocab=64,prefill_token_ms=5"))
    ctx = [1, 2, 3, 4, 5, 6, 7, 8]
    first = await target.verify(VerifyRequest("s", ctx))
    assert (first.stats.cached_tokens, first.stats.computed_tokens) == (0, 8)
    assert first.stats.compute_seconds >= 0.005 * 7 - SLACK, "7 context tokens before the verified one"
    ext = [*ctx, 9, 10, 11, 12]
    second = await target.verify(VerifyRequest("s", ext))
    assert (second.stats.cached_tokens, second.stats.computed_tokens) == (8, 4), "only the new tokens"
    assert second.stats.compute_seconds >= 0.005 * 3 - SLACK, "3 tokens verified elsewhere are caught up"


async def test_drafter_latency_ttft_then_tpot() -> None:
    drafter = LocalDrafter(SyntheticDrafter("synthetic:vocab=64,ttft_ms=40,tpot_ms=20"))
    req = DraftRequest("s", [1, 2, 3], lookahead=3, max_tokens=3)
    chunks = [c async for c in drafter.draft(req)]
    assert [len(c.tokens) for c in chunks] == [3]
    assert chunks[0].stats.compute_seconds >= 0.040 + 2 * 0.020 - SLACK, "ttft then tpot per token"
    chunks = [c async for c in drafter.draft(DraftRequest("s", [1, 2, 3, 4], lookahead=2, max_tokens=4))]
    assert [len(c.tokens) for c in chunks] == [2, 2]
    for c in chunks:
        assert c.stats.compute_seconds >= 2 * 0.020 - SLACK, "tpot per drafted token"


def test_a_pass_reports_its_modelled_seconds_whatever_the_timer_did() -> None:
    """On a virtual clock no real time passes, and a pass shorter than the
    timer's millisecond is owed and slept later: the chunk still reports what
    the model's passes cost (what the lookahead planner reads as the
    drafter's own time)."""
    from dsi.tools.experiments.virtual_time import run_virtual

    async def chunks(spec: str) -> list[float]:
        drafter = LocalDrafter(SyntheticDrafter(spec))
        req = DraftRequest("s", [1, 2, 3], lookahead=2, max_tokens=4)
        return [c.stats.compute_seconds async for c in drafter.draft(req)]

    assert run_virtual(chunks("synthetic:vocab=64,ttft_ms=40,tpot_ms=20")) == pytest.approx([0.060, 0.040])
    assert asyncio.run(chunks("synthetic:vocab=64,ttft_ms=0.3,tpot_ms=0.3")) == pytest.approx([0.0006, 0.0006])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6, top_k=3),
        SamplingParams(temperature=1.4, top_k=100),
        SamplingParams(temperature=0.8, top_p=0.7),
    ],
    ids=str,
)
async def test_sparse_decisions_equal_dense_ones(params: SamplingParams) -> None:
    """The synthetic target decides on its rows' support only; the tokens are
    those of the dense rows' rule (dsi.domain.sampling.verify_rows)."""
    from dsi.backends.synthetic import SparseRows
    from dsi.domain import sampling
    from dsi.domain.types import DraftToken, VerifyRequest

    t = SyntheticTarget("synthetic:vocab=500,seed=3,support=6")
    rng = np.random.default_rng(1)
    for trial in range(40):
        ctx = rng.integers(0, 500, size=4 + trial % 5).tolist()
        drafts = [DraftToken(int(x)) for x in rng.integers(0, 500, size=trial % 6)]
        fwd = await t.forward(t.new_state(), [*ctx, *(d.token_id for d in drafts)], len(drafts) + 1)
        assert isinstance(fwd.scores, SparseRows) and fwd.rows.shape == (len(drafts) + 1, 500)
        request = VerifyRequest("s", ctx, drafts, params, seed=trial)
        got = await t.decide(request, fwd)
        assert got == sampling.verify_rows(fwd.rows, drafts, params, trial, len(ctx)), f"trial {trial}"


async def test_synthetic_sleeps_take_what_the_spec_says_on_a_timer_that_returns_late(monkeypatch) -> None:
    """The event loop's timer wakes up late (milliseconds rounded up, then the wake-up): the
    synthetic models learn by how much and sleep that much less, so a pass costs its spec on
    average; a loop busy far longer is the system's delay, and only its first 1.2 ms are corrected."""
    import asyncio

    from dsi.backends import synthetic

    loop = asyncio.get_running_loop()
    now = [0.0]
    late = [0.0006]
    monkeypatch.setattr(loop, "time", lambda: now[0])

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds + late[0]

    monkeypatch.setattr(synthetic.asyncio, "sleep", fake_sleep)
    timer = synthetic.TimerLateness()
    took = []
    for _ in range(100):
        start = now[0]
        await timer.sleep(0.030)
        took.append(now[0] - start)
    assert took[0] == pytest.approx(0.0306)  # nothing learnt yet
    assert sum(took[-20:]) / 20 == pytest.approx(0.030, abs=2e-6)
    late[0] = 0.050  # a loop busy with other work: corrected by 1.2 ms at most
    for _ in range(100):
        start = now[0]
        await timer.sleep(0.030)
    assert timer.seconds == pytest.approx(0.0012, abs=1e-6)
    assert now[0] - start == pytest.approx(0.030 - 0.0012 + 0.050, abs=1e-5)


async def test_a_pass_timer_waits_a_pass_to_the_microsecond_on_a_timer_that_waits_whole_milliseconds(
    monkeypatch,
) -> None:
    """A model's own process (time_passes_exactly): the event loop's timer
    waits whole milliseconds, rounded up, and wakes 0.4 ms after that, so an
    ``asyncio.sleep`` of 19.5 or 20 ms takes 20.4. A PassTimer waits on the
    loop until 1.5 ms before the end, then in ``time.sleep`` (late by a steady
    0.15 ms here: learnt), so a pass takes its length; where passes overlap
    none blocks the loop."""
    import asyncio

    from dsi.backends import synthetic

    loop = asyncio.get_running_loop()
    now = [100.0]

    def clock() -> float:
        now[0] += 1e-6  # reading the clock takes a microsecond (a spin ends)
        return now[0]

    real_sleep = asyncio.sleep
    on_loop: list[float] = []
    blocked: list[float] = []

    async def loop_sleep(seconds: float) -> None:
        on_loop.append(seconds)
        await real_sleep(0)
        now[0] += math.ceil(seconds * 1000 - 1e-9) / 1000 + 0.0004

    def kernel_sleep(seconds: float) -> None:
        blocked.append(seconds)
        now[0] += seconds + 0.00015

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(synthetic.asyncio, "sleep", loop_sleep)
    monkeypatch.setattr(synthetic.time, "sleep", kernel_sleep)
    timer = synthetic.PassTimer()
    for ms in (20.0, 19.5, 4.16, 0.2):
        took = []
        for _ in range(30):
            start = now[0]
            await timer.sleep(ms / 1000)
            took.append(now[0] - start)
        assert sum(took[-10:]) / 10 == pytest.approx(ms / 1000, abs=2e-5), ms
    assert timer.late == pytest.approx(0.00015, abs=1e-5)
    assert not timer.busy

    on_loop.clear()
    blocked.clear()
    await asyncio.gather(timer.sleep(0.020), timer.sleep(0.020))  # two passes at once: the loop's timer only
    assert blocked == [] and on_loop[:2] == pytest.approx([0.0185, 0.0185])
    assert not timer.busy


async def test_only_a_loop_told_to_time_passes_exactly_gets_a_pass_timer() -> None:
    """The target and drafter mains switch it on for their own loop; a loop
    that runs several services (an in-process cluster) keeps the timer that
    never blocks."""
    from dsi.backends import synthetic

    assert isinstance(synthetic.timer(), synthetic.TimerLateness)
    synthetic.time_passes_exactly()
    try:
        assert isinstance(synthetic.timer(), synthetic.PassTimer)
    finally:
        del synthetic._TIMERS[asyncio.get_running_loop()]  # the test's loop may serve the next test

    def other_loop() -> object:
        async def which() -> object:
            return synthetic.timer()

        return asyncio.run(which())

    assert isinstance(await asyncio.to_thread(other_loop), synthetic.TimerLateness)


async def test_a_pass_timer_waits_short_passes_each_unless_other_passes_are_in_progress(monkeypatch) -> None:
    """With a PassTimer a 0.2 ms drafter step is waited for on its own; while
    another pass's wait is in progress (the loop's timer then, whole
    milliseconds) a session's short passes are owed and waited together."""
    from dsi.backends import synthetic

    slept: list[float] = []

    async def fake_sleep(self, seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(synthetic.PassTimer, "sleep", fake_sleep)
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: 5.0)  # no CPU time to credit
    monkeypatch.setitem(synthetic._TIMERS, asyncio.get_running_loop(), synthetic.PassTimer())  # undone after
    drafter = LocalDrafter(SyntheticDrafter("synthetic:vocab=64,ttft_ms=0.2,tpot_ms=0.2"))
    [c async for c in drafter.draft(DraftRequest("s0", [1, 2, 3], lookahead=3, max_tokens=3))]
    assert slept == pytest.approx([0.0002] * 3)  # alone: each pass waits as it comes
    slept.clear()
    monkeypatch.setattr(synthetic.timer(), "waiting", 1)  # another pass is in progress
    chunks = [c async for c in drafter.draft(DraftRequest("s", [1, 2, 3], lookahead=10, max_tokens=10))]
    assert sum(len(c.tokens) for c in chunks) == 10
    assert slept == pytest.approx([0.001, 0.001])  # every 5 steps


async def test_passes_shorter_than_the_timers_millisecond_are_slept_together(monkeypatch) -> None:
    """A 0.2 ms drafter step cannot be an event-loop sleep of its own (the
    timer waits whole milliseconds: each would take ~1 ms, 5x the spec): a
    session's short passes are owed and slept once a millisecond is due, so
    10 drafts take 2 ms in two sleeps, not 10 ms."""
    from dsi.backends import synthetic

    slept: list[float] = []

    async def fake_sleep(self, seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(synthetic.TimerLateness, "sleep", fake_sleep)
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: 5.0)  # no CPU time to credit (next test)
    drafter = LocalDrafter(SyntheticDrafter("synthetic:vocab=64,ttft_ms=0.2,tpot_ms=0.2"))
    chunks = [c async for c in drafter.draft(DraftRequest("s", [1, 2, 3], lookahead=10, max_tokens=10))]
    assert sum(len(c.tokens) for c in chunks) == 10
    assert slept == pytest.approx([0.001, 0.001])  # every 5 steps
    monkeypatch.setattr(asyncio.get_running_loop(), "exact_timer", True, raising=False)  # a virtual clock
    slept.clear()
    [c async for c in drafter.draft(DraftRequest("s2", [1, 2, 3], lookahead=3, max_tokens=3))]
    assert slept == pytest.approx([0.0002] * 3)  # its sleeps are exact: each pass sleeps as it comes
    target = SyntheticTarget("synthetic:vocab=64,ttft_ms=30,tpot_ms=30")
    slept.clear()
    await LocalTarget(target).verify(VerifyRequest("s", [1, 2, 3]))
    assert slept == pytest.approx([0.030])  # a pass of a millisecond or more sleeps as it comes


async def test_the_emulations_own_cpu_time_counts_towards_the_pass(monkeypatch) -> None:
    """The pseudo model's arithmetic (dense 32k rows for a drafted token) is
    not the modelled device's time: it is credited against the session's
    next sleep, at most a timer's millisecond; a zero-latency model owes nothing."""

    from dsi.backends import synthetic

    slept: list[float] = []

    async def fake_sleep(self, seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(synthetic.TimerLateness, "sleep", fake_sleep)
    now = 1000.0
    monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: now)
    latency = synthetic._Latency(synthetic.SyntheticSpec.parse("synthetic:ttft_ms=30,tpot_ms=30"))
    state = synthetic._State()
    with latency.charging([state]):
        now += 0.0004
    assert state.owed_ms == pytest.approx(-0.4)
    await latency.sleep(state, 0.0)
    assert slept == [pytest.approx(0.0296)]
    with latency.charging([state]):
        now += 5.0
    assert state.owed_ms == -synthetic.TIMER_MS  # a busy loop's delay is not the model's to give back
    free = synthetic._Latency(synthetic.SyntheticSpec.parse("synthetic:ttft_ms=0,tpot_ms=0"))
    zero = synthetic._State()
    with free.charging([zero]):
        now += 1.0
    assert zero.owed_ms == 0.0 and await free.sleep(zero, 0.0) == 0.0


def test_the_cold_start_tool_times_the_same_work_after_each_kind_of_gap() -> None:
    """tools/cold_start.py (docs/benchmarks.md section 13): every kind of gap
    is measured, each time on new positions of the model (its cache never
    answers), so each sample is real work."""
    from tools.cold_start import GAPS, measure

    out = measure(rounds=2)
    assert set(out) == set(GAPS)
    assert all(len(xs) == 2 and all(x > 0 for x in xs) for xs in out.values())


async def test_the_cold_start_tool_times_grpc_stream_writes_after_each_gap() -> None:
    """tools/cold_start.py --grpc: a stream write on loopback, timed (wall
    and its thread's CPU) after each gap; the echo server lives in this
    process and stops with the measurement."""
    from tools.cold_start import grpc_writes

    out = await grpc_writes(3, gaps=(0.0, 0.002))
    assert set(out) == {0.0, 0.002}
    assert all(wall > 0 and cpu >= 0 for wall, cpu in out.values())
