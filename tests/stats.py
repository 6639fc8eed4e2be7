"""Statistics for the sampling tests: exact continuation distributions and a
chi-square goodness-of-fit test with merged small cells."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection

import numpy as np

# The 0.1% critical values of the chi-square distribution, by degrees of freedom.
CHI2_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
    11: 31.26,
    12: 32.91,
    13: 34.53,
    14: 36.12,
    15: 37.70,
    16: 39.25,
    17: 40.79,
    18: 42.31,
    19: 43.82,
    20: 45.31,
    21: 46.80,
    22: 48.27,
    23: 49.73,
    24: 51.18,
    25: 52.62,
    26: 54.05,
}


def chi2_critical_999(dof: int) -> float:
    """The 0.1% critical value: the table, else the Wilson-Hilferty
    approximation (within 0.2% of the exact value from 20 degrees on)."""
    if dof in CHI2_999:
        return CHI2_999[dof]
    z = 3.0902  # the standard normal's 0.999 quantile
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: Counter, probs: dict[tuple[int, ...], float], n: int) -> tuple[float, int]:
    """Pearson's statistic, pooling outcomes of expected count < 5 into one
    cell (and that cell into the smallest other one if it is still < 5)."""
    assert set(counts) <= {k for k, p in probs.items() if p > 0}, "an outcome of probability 0 was produced"
    cells: list[list[float]] = []  # [observed, expected]
    pooled = [0.0, 0.0]
    for k, p in probs.items():
        exp = n * p
        target = pooled if exp < 5 else None
        if target is None:
            cells.append([float(counts.get(k, 0)), exp])
        else:
            target[0] += counts.get(k, 0)
            target[1] += exp
    if pooled[1] > 0:
        if pooled[1] < 5 and cells:
            smallest = min(cells, key=lambda c: c[1])
            smallest[0] += pooled[0]
            smallest[1] += pooled[1]
        else:
            cells.append(pooled)
    stat = sum((obs - exp) ** 2 / exp for obs, exp in cells)
    return stat, len(cells) - 1


def assert_fits(counts: Counter, probs: dict[tuple[int, ...], float], what: str) -> None:
    """Fail when ``counts`` does not fit ``probs`` at the 0.1% level."""
    n = sum(counts.values())
    stat, dof = chi_square(counts, probs, n)
    assert dof >= 1, f"{what}: too few cells for a test"
    crit = chi2_critical_999(dof)
    worst = sorted(probs, key=lambda k: -abs(counts.get(k, 0) - n * probs[k]))[:3]
    detail = ", ".join(f"{k}: {counts.get(k, 0)} vs {n * probs[k]:.1f}" for k in worst)
    assert stat < crit, f"{what}: chi2={stat:.1f} >= {crit:.1f} ({dof} dof, n={n}); largest gaps {detail}"


def exact_continuations(
    next_probs: Callable[[list[int]], np.ndarray], prompt: list[int], n: int, eos: Collection[int] = ()
) -> dict[tuple[int, ...], float]:
    """P(x_1..x_n | prompt) for every continuation of at most ``n`` tokens,
    from the target's warped next-token distribution ``next_probs(context)``.
    A continuation ends early at an end-of-sequence id."""
    out: dict[tuple[int, ...], float] = {}

    def walk(seq: list[int], prob: float, depth: int) -> None:
        if depth == n or (depth and seq[-1] in eos):
            out[tuple(seq[len(prompt) :])] = prob
            return
        p = next_probs(seq)
        for tok in np.flatnonzero(p > 0):
            walk([*seq, int(tok)], prob * float(p[tok]), depth + 1)

    walk(list(prompt), 1.0, 0)
    assert math.isclose(sum(out.values()), 1.0, rel_tol=1e-9)
    return out
