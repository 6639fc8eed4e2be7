"""The decision rule of dsi/domain/sampling.py: keyed Gumbel-max sampling,
the keyed noise it is built on, the drafter's guesses (the Gumbel coupling),
verify_rows, and logit warping.

The statistical tests use fixed seeds, so they are deterministic: they either
always pass or always fail. Their thresholds are chi-square critical values at
a significance level of 0.001, so a correct implementation passes them for all
but a tiny fraction of seed choices, and a wrong distribution (off by a few
percent in any cell) fails them.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest

from dsi.domain.sampling import choose, gumbel_noise, keyed_uniforms, log_probs, noise_keys, verify_rows, warp
from dsi.domain.types import GREEDY, DraftToken, SamplingParams
from tests.stats import chi2_critical_999

V = 6


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the cells of non-zero probability, and its
    degrees of freedom. Cells of probability 0 must be empty."""
    counts = np.asarray(counts, dtype=np.float64)
    zero = probs == 0
    assert not counts[zero].any(), f"tokens of probability 0 were produced: counts={counts}, probs={probs}"
    n = counts.sum()
    expected = n * probs[~zero]
    stat = float(((counts[~zero] - expected) ** 2 / expected).sum())
    return stat, int((~zero).sum()) - 1


def assert_matches(counts: np.ndarray, probs: np.ndarray, what: str) -> None:
    stat, df = chi_square(counts, probs)
    if df == 0:
        return  # a one-point distribution: chi_square already checked the empty cells
    crit = chi2_critical_999(df)
    freq = counts / counts.sum()
    assert stat < crit, (
        f"{what}: chi-square {stat:.2f} >= {crit:.2f} (df={df}); empirical {np.round(freq, 4)} vs expected {probs}"
    )


# ---------------------------------------------------------------------------
# The keyed noise: a specified function (docs/architecture.md), checked here
# against a straightforward reimplementation with Python integers.
# ---------------------------------------------------------------------------


def ref_fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def ref_uniform(seed: int, position: int, token: int) -> float:
    key = hashlib.blake2b(struct.pack("<QQ", seed % 2**64, position % 2**64), digest_size=12).digest()
    k1, k2, k3 = (int.from_bytes(key[i : i + 4], "little") for i in (0, 4, 8))
    x = ref_fmix32(((token * 0x9E3779B1) & 0xFFFFFFFF) ^ k1)
    hi, lo = ref_fmix32(x ^ k2), ref_fmix32(x ^ k3) >> 11
    return ((hi << 21 | lo) + 0.5) / 2**53


def test_keyed_uniforms_follow_the_specification() -> None:
    ids = np.array([0, 1, 2, 7, 4095, 128_255, 2**31, 2**32 - 1])
    for seed, position in [(0, 0), (1, 2), (2**63 + 5, 17), (2**64 - 1, 2**40), (123456789, 100_000)]:
        got = keyed_uniforms(seed, position, ids)
        want = np.array([ref_uniform(seed, position, int(t)) for t in ids])
        assert np.array_equal(got, want), f"seed {seed} position {position}: {got} vs {want}"
    assert noise_keys(-1, 3) == noise_keys(2**64 - 1, 3), "negative seeds wrap to 64 bits"


def test_keyed_uniforms_lie_in_the_open_unit_interval_and_are_uniform() -> None:
    u = keyed_uniforms(3, 9, np.arange(200_000))
    assert u.min() > 0.0 and u.max() < 1.0, "log(-log(u)) needs 0 < u < 1"
    counts, _ = np.histogram(u, bins=50, range=(0.0, 1.0))
    assert_matches(counts, np.full(50, 1 / 50), "keyed uniforms over 200,000 token ids")
    over_positions = np.array([keyed_uniforms(3, pos, np.array([5]))[0] for pos in range(20_000)])
    counts, _ = np.histogram(over_positions, bins=20, range=(0.0, 1.0))
    assert_matches(counts, np.full(20, 1 / 20), "one token's uniform over 20,000 positions")


def test_keyed_uniforms_differ_across_seeds_positions_and_tokens() -> None:
    base = keyed_uniforms(5, 10, np.arange(64))
    assert len(set(base.tolist())) == 64
    for other in (keyed_uniforms(6, 10, np.arange(64)), keyed_uniforms(5, 11, np.arange(64))):
        assert not np.any(other == base)
        assert abs(np.corrcoef(base, other)[0, 1]) < 0.5


def test_gumbel_noise_has_the_gumbel_distribution() -> None:
    g = gumbel_noise(1, 2, 400_000)
    assert abs(g.mean() - 0.5772156649) < 0.01, "mean: the Euler-Mascheroni constant"
    assert abs(g.var() - math.pi**2 / 6) < 0.02, "variance: pi^2 / 6"


# ---------------------------------------------------------------------------
# choose(): the decision rule
# ---------------------------------------------------------------------------

LOGITS = {
    "spread": np.log(np.array([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])),
    "zeros": np.log(np.array([0.50, 0.30, 0.20, 1e-300, 1e-300, 1e-300])),
    "masked": np.array([-np.inf, 1.0, -np.inf, 0.5, 0.0, -np.inf]),
    "peaked": np.array([6.0, 0.0, 0.5, 0.0, 1.0, -2.0]),
}
PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.6": SamplingParams(temperature=0.6),
    "t1.5-topk3": SamplingParams(temperature=1.5, top_k=3),
    "t0.9-topp0.8": SamplingParams(temperature=0.9, top_p=0.8),
    "t0.8-topk4-topp0.9": SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
}


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("logits", list(LOGITS))
def test_choose_samples_the_warped_distribution(logits: str, params: str) -> None:
    """Over seeds (one position) and over positions (one seed), the chosen
    token follows warp(logits) exactly."""
    x, sp = LOGITS[logits], PARAMS[params]
    p = warp(x, sp)
    n = 6000
    by_seed = np.bincount([choose(x, sp, seed, 17) for seed in range(n)], minlength=V)
    assert_matches(by_seed, p, f"choose() over seeds ({logits}, {params})")
    by_position = np.bincount([choose(x, sp, 99, pos) for pos in range(n)], minlength=V)
    assert_matches(by_position, p, f"choose() over positions ({logits}, {params})")


def test_choices_at_two_positions_are_independent() -> None:
    """The joint distribution of the tokens at positions 4 and 5 (one seed per
    trial) is the product of the marginals: each position's noise is its own."""
    x, sp = LOGITS["spread"], PARAMS["t1"]
    p = warp(x, sp)
    joint = np.zeros((V, V))
    for seed in range(20_000):
        joint[choose(x, sp, seed, 4), choose(x, sp, seed, 5)] += 1
    assert_matches(joint.ravel(), np.outer(p, p).ravel(), "joint of two positions")


def test_choose_greedy_is_the_argmax_with_ties_to_the_lowest_id() -> None:
    assert choose(np.array([0.1, 3.0, -1.0, 3.0]), GREEDY, 5, 7) == 1
    assert choose(LOGITS["peaked"], GREEDY, 0, 0) == 0


def test_choose_is_a_function_of_seed_position_and_logits() -> None:
    x, sp = LOGITS["spread"], PARAMS["t1"]
    a = [choose(x, sp, s, 4) for s in range(300)]
    assert a == [choose(x.copy(), sp, s, 4) for s in range(300)]
    assert a != [choose(x, sp, s, 5) for s in range(300)], "another position uses other noise"
    shifted = [choose(x + 7.5, sp, s, 4) for s in range(300)]
    assert a == shifted, "adding a constant to every logit changes nothing (same distribution)"


def test_log_probs_are_the_warped_log_probabilities_up_to_a_constant() -> None:
    rng = np.random.default_rng(2)
    for sp in PARAMS.values():
        x = rng.normal(scale=2.0, size=12)
        lp, p = log_probs(x, sp), warp(x, sp)
        assert np.array_equal(np.isfinite(lp), p > 0), "excluded tokens are -inf"
        kept = p > 0
        diff = lp[kept] - np.log(p[kept])
        assert np.allclose(diff, diff[0], atol=1e-9)


# ---------------------------------------------------------------------------
# The drafter's guess: the same rule on the drafter's distribution
# ---------------------------------------------------------------------------


def test_a_drafter_equal_to_the_target_is_always_right() -> None:
    x, sp = LOGITS["spread"], PARAMS["t0.8-topk4-topp0.9"]
    assert all(choose(x, sp, s, 3) == choose(x.copy(), sp, s, 3) for s in range(2000))


def test_gumbel_coupling_meets_its_acceptance_bound() -> None:
    """With shared noise, P(guess == target's token) >= (1 - TV) / (1 + TV)
    (the Gumbel-max coupling; TV is the total variation distance), and is
    close to 1 - TV for nearby distributions. Averaged over random pairs."""
    rng = np.random.default_rng(7)
    sp = PARAMS["t1"]
    hits, bound, optimal, n = 0, 0.0, 0.0, 0
    for trial in range(300):
        x = rng.normal(scale=1.5, size=8)
        y = x + rng.normal(scale=0.7, size=8)
        p, q = warp(x, sp), warp(y, sp)
        tv = 0.5 * float(np.abs(p - q).sum())
        for seed in range(40):
            hits += choose(x, sp, seed, trial) == choose(y, sp, seed, trial)
            bound += (1 - tv) / (1 + tv)
            optimal += 1 - tv
            n += 1
    rate = hits / n
    assert rate >= bound / n - 0.02, f"acceptance {rate:.3f} below the coupling bound {bound / n:.3f}"
    assert rate <= optimal / n + 0.02, f"acceptance {rate:.3f} above 1 - TV = {optimal / n:.3f}: impossible"


def test_guesses_are_accepted_independently_of_each_other() -> None:
    """The exactness of the output never depends on the drafts: whatever the
    draft, the target's token is the same."""
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(5, V))
    sp = PARAMS["t1"]
    tokens = [choose(rows[i], sp, 11, 30 + i) for i in range(5)]
    for _ in range(50):
        drafts = [DraftToken(int(t)) for t in rng.integers(0, V, size=4)]
        decisions, _, _ = verify_rows(rows, drafts, sp, 11, 30)
        assert [d.token_id for d in decisions] == tokens[:4]


# ---------------------------------------------------------------------------
# verify_rows
# ---------------------------------------------------------------------------


def _rows(rng: np.random.Generator, m: int, vocab: int = 10) -> np.ndarray:
    return rng.normal(size=(m + 1, vocab))


@pytest.mark.parametrize("reject_at", [None, 0, 2, 4])
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.9, top_k=6, top_p=0.95)], ids=str)
def test_verify_rows(reject_at: int | None, params: SamplingParams) -> None:
    rng = np.random.default_rng(0 if reject_at is None else reject_at + 1)
    m, start, seed = 5, 11, 3
    rows = _rows(rng, m)
    best = [choose(rows[i], params, seed, start + i) for i in range(m + 1)]
    tokens = list(best[:m])
    if reject_at is not None:
        tokens[reject_at] = (tokens[reject_at] + 1) % rows.shape[1]
        if reject_at + 2 < m:  # a later wrong draft must not change anything
            tokens[reject_at + 2] = (tokens[reject_at + 2] + 3) % rows.shape[1]
    drafts = [DraftToken(t) for t in tokens]
    decisions, path, nxt = verify_rows(rows, drafts, params, seed=seed, start_position=start)
    num_accepted = len(path)
    assert path == list(range(num_accepted)), "a chain's accepted path is a prefix"
    assert len(decisions) == m, "every draft position gets a decision"
    for i, d in enumerate(decisions):
        assert d.token_id == best[i], f"decision {i} must be the rule's token at position {start + i}"
        assert d.accepted == (tokens[i] == best[i]), f"decision {i}: accepted iff the draft equals it"
    expected_run = m if reject_at is None else reject_at
    assert num_accepted == expected_run, f"num_accepted {num_accepted}, expected {expected_run}"
    if reject_at is None:
        assert nxt == best[m], "all accepted: the next token is the bonus row's token"
    else:
        assert nxt == best[reject_at] == decisions[num_accepted].token_id, "a rejection: the correction"


def test_verify_rows_with_no_drafts_is_a_plain_step() -> None:
    rows = np.array([[0.1, 3.0, -1.0, 3.0]])
    assert verify_rows(rows, [], GREEDY, seed=0, start_position=0) == ([], [], 1), "ties go to the lowest id"
    sp = PARAMS["t1"]
    assert verify_rows(rows, [], sp, seed=4, start_position=9) == ([], [], choose(rows[0], sp, 4, 9))


def test_verify_rows_decisions_do_not_depend_on_chunking() -> None:
    """A position's token depends only on (row, seed, position): a later chunk
    reproduces the later decisions (any replica may decide a position)."""
    rng = np.random.default_rng(5)
    m, start, seed = 5, 8, 42
    sp = SamplingParams(temperature=0.9, top_k=6)
    rows = _rows(rng, m)
    drafts = [DraftToken(int(t)) for t in rng.integers(0, 10, size=m)]
    full, _, _ = verify_rows(rows, drafts, sp, seed, start)
    for k in range(1, m):
        tail, _, _ = verify_rows(rows[k:], drafts[k:], sp, seed, start + k)
        assert tail == full[k:], f"decisions of the chunk starting at draft {k} differ"


# ---------------------------------------------------------------------------
# warp
# ---------------------------------------------------------------------------


def ref_warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Straightforward reference: temperature, then top-k (ties at the k-th
    value kept), then the smallest prefix (by descending probability, ties by
    lower id) whose mass reaches top_p."""
    x = [float(v) / temperature for v in logits]
    n = len(x)
    if 0 < top_k < n:
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    p = [v / s for v in e]
    if top_p < 1.0:
        order = sorted(range(n), key=lambda i: (-p[i], i))
        keep, acc = [], 0.0
        for i in order:
            keep.append(i)
            acc += p[i]
            if acc >= top_p:
                break
        p = [p[i] if i in keep else 0.0 for i in range(n)]
        s = sum(p)
        p = [v / s for v in p]
    return np.array(p)


WARP_PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=8, top_p=0.7),
    SamplingParams(temperature=1.0, top_k=50),  # larger than the vocabulary: off
]


@pytest.mark.parametrize("params", WARP_PARAMS, ids=str)
def test_warp_matches_reference(params: SamplingParams) -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        logits = rng.normal(scale=2.0, size=16)
        got = warp(logits, params)
        want = ref_warp(logits, params.temperature, params.top_k, params.top_p)
        assert got.dtype == np.float64
        assert np.allclose(got, want, rtol=1e-12, atol=1e-15), f"{params}: {got} vs {want}"
        assert math.isclose(got.sum(), 1.0, rel_tol=1e-12), "warped probabilities must sum to 1"
        assert np.all(got >= 0)
        if params.top_k and params.top_k < 16:
            assert np.count_nonzero(got) <= params.top_k


@pytest.mark.parametrize("params", WARP_PARAMS, ids=str)
def test_warp_matches_transformers_warpers(params: SamplingParams) -> None:
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(12)
    ids = torch.zeros((1, 1), dtype=torch.long)
    for _ in range(20):
        logits = rng.normal(scale=2.0, size=16)
        s = torch.tensor(logits, dtype=torch.float64)[None]
        # The order of transformers' generate(): temperature, top-k, top-p.
        s = lp.TemperatureLogitsWarper(params.temperature)(ids, s)
        if params.top_k:
            s = lp.TopKLogitsWarper(params.top_k)(ids, s)
        if params.top_p < 1.0:
            s = lp.TopPLogitsWarper(params.top_p)(ids, s)
        want = torch.softmax(s, dim=-1)[0].numpy()
        got = warp(logits, params)
        assert np.array_equal(got > 0, want > 0), f"{params}: kept {np.flatnonzero(got)}, HF {np.flatnonzero(want)}"
        assert np.allclose(got, want, rtol=1e-9, atol=1e-12), f"{params}: {got} vs {want}"


def test_warp_temperature_sharpens_and_flattens() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    ent = {}
    for t in (0.25, 1.0, 4.0):
        p = warp(logits, SamplingParams(temperature=t))
        want = np.exp(logits / t) / np.exp(logits / t).sum()
        assert np.allclose(p, want, rtol=1e-12), f"T={t}"
        ent[t] = float(-(p * np.log(p)).sum())
    assert ent[0.25] < ent[1.0] < ent[4.0], f"entropy must grow with temperature: {ent}"


def test_warp_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = np.array([2.0, 1.0, 1.0, 1.0, 0.0])
    p = warp(logits, SamplingParams(temperature=1.0, top_k=2))
    assert list(np.flatnonzero(p)) == [0, 1, 2, 3], f"every token tied with the k-th must be kept: {p}"
    assert p[1] == p[2] == p[3]


def test_warp_top_p_ties_are_broken_deterministically() -> None:
    logits = np.zeros(4)
    p = warp(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert np.count_nonzero(p) == 2, f"0.5 of a uniform over 4 needs exactly 2 tokens: {p}"
    assert list(np.flatnonzero(p)) == [0, 1], (
        "tied tokens are kept lowest id first (a stable, replica-independent rule)"
    )
    assert np.array_equal(p, warp(logits, SamplingParams(temperature=1.0, top_p=0.5)))


def test_warp_top_p_keeps_at_least_the_top_token() -> None:
    logits = np.array([5.0, 0.0, 0.0])
    p = warp(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert list(np.flatnonzero(p)) == [0] and p[0] == 1.0


def test_warp_with_minus_inf_logits() -> None:
    logits = np.array([-np.inf, 1.0, -np.inf, 0.0, -np.inf])
    p = warp(logits, SamplingParams(temperature=0.7, top_k=4))
    assert list(np.flatnonzero(p)) == [1, 3], "masked tokens stay at 0 even when top_k exceeds the finite ones"
    assert not np.isnan(p).any()


def test_warp_rejects_greedy() -> None:
    with pytest.raises(ValueError):
        warp(np.zeros(3), GREEDY)
