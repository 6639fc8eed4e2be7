"""The decision rule: which token the target puts at each position.

dsi decides every position with **keyed Gumbel-max sampling**. The token at
sequence position ``i`` is

    argmax_x ( log p_i(x) + G(seed, i, x) )

where ``p_i`` is the target's next-token distribution after the committed
prefix (warped by temperature, top-k and top-p) and ``G(seed, i, x)`` is
standard Gumbel noise computed by hashing ``(seed, i, x)``. By the Gumbel-max
theorem the result is a sample from ``p_i``; because the noise of position
``i`` is independent of the noise of every other position, and the prefix is
a function of the earlier positions' noise only, every committed token is
distributed exactly as the target's conditional distribution. Greedy decoding
is the same rule with zero noise.

The token at a position is therefore a *function* of (seed, position, the
target's distribution there): every target replica, every verification that
covers the position with the right prefix, every strategy, computes the same
token. Which verification decides a position, and when, carries no
information (docs/architecture.md, "Why timing cannot bias the output").

A draft is a *guess* of that token. The drafter guesses with the same rule on
its own distribution, ``argmax_x (log q_i(x) + G(seed, i, x))``: where ``q`` is
close to ``p`` the two argmaxes coincide (the Gumbel coupling), and a guess
never needs to be accompanied by a distribution. The target accepts a draft
when it equals its own token; the first mismatch is replaced by the target's
token (the correction), and when every draft matches, the next token is the
target's token after them (the bonus). The output never depends on the
drafts, only the speed does.

Everything here is numpy in float64 on the host. The noise is defined by
32-bit integer arithmetic that never overflows an int64 (so the same values
can be computed by torch on any device).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

import numpy as np

from dsi.domain.types import ROOT, Decision, DraftToken, SamplingParams, tree_parents

_M32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_GOLDEN32 = 0x9E3779B1  # odd: multiplication by it is a bijection modulo 2^32


def noise_keys(seed: int, position: int) -> tuple[int, int, int]:
    """Three 32-bit keys for the noise of ``position`` under ``seed``."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed & _U64, position & _U64), digest_size=12).digest()
    k = int.from_bytes(digest, "little")
    return k & _M32, (k >> 32) & _M32, (k >> 64) & _M32


def _mul32(x: np.ndarray, c: int) -> np.ndarray:
    """``x * c mod 2^32`` for int64 ``x`` < 2^32, with products below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def keyed_uniforms(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """Uniform numbers in (0, 1), 53 bits each, one per token id, determined by
    ``(seed, position, token id)`` alone."""
    k1, k2, k3 = noise_keys(seed, position)
    x = _fmix32(_mul32(np.asarray(token_ids, dtype=np.int64) & _M32, _GOLDEN32) ^ k1)
    hi = _fmix32(x ^ k2)  # 32 bits
    lo = _fmix32(x ^ k3) >> 11  # 21 bits
    return ((hi << 21 | lo).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def gumbel_noise(seed: int, position: int, vocab_size: int) -> np.ndarray:
    """Standard Gumbel noise ``G(seed, position, x)`` for every token id ``x``."""
    return -np.log(-np.log(keyed_uniforms(seed, position, np.arange(vocab_size))))


def warp(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Dense float64 probabilities after temperature, top-k and top-p."""
    if params.greedy:
        raise ValueError("warp() is for sampling; greedy decoding uses argmax")
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = min(int(np.searchsorted(cum, params.top_p, side="left")) + 1, p.size)
        mask = np.zeros(p.size, dtype=bool)
        mask[order[:keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def log_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Warped log-probabilities up to an additive constant (-inf = excluded)."""
    if params.top_p < 1.0:
        with np.errstate(divide="ignore"):
            return np.log(warp(logits, params))
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    return x


def greedy_token(scores: np.ndarray) -> int:
    """Argmax; ties go to the lowest id, like torch.argmax in HF generate."""
    return int(np.argmax(scores))


def choose(logits: np.ndarray, params: SamplingParams, seed: int, position: int) -> int:
    """The token at ``position`` under the decision rule, from raw ``logits``:
    the argmax when greedy, else the keyed Gumbel-max sample of the warped
    distribution. The target decides with it; a drafter guesses with it."""
    if params.greedy:
        return greedy_token(logits)
    return greedy_token(log_probs(logits, params) + gumbel_noise(seed, position, len(logits)))


def choose_sparse(
    ids: np.ndarray, logits: np.ndarray, vocab_size: int, params: SamplingParams, seed: int, position: int
) -> int | None:
    """:func:`choose` for logits that are ``-inf`` outside ``ids`` (ascending,
    distinct), from those ids alone: the same token, with noise for the
    support only. None for top-p (its normalisation over the whole row may
    round differently; decide the dense row then)."""
    if params.greedy:
        return int(ids[np.argmax(logits)])  # ids ascending: ties go to the lowest id
    if params.top_p < 1.0:
        return None
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < vocab_size and params.top_k <= x.size:  # else the dense k-th value is -inf: no cut
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    noise = -np.log(-np.log(keyed_uniforms(seed, position, ids)))
    return int(ids[np.argmax(x + noise)])


def top_candidates(logits: np.ndarray, params: SamplingParams, seed: int, position: int, k: int) -> list[int]:
    """The ``k`` best guesses of the token at ``position``: the rule's choice
    first, then the runners-up of the same noisy scores (Gumbel top-k). A
    drafter proposes them as a node's children, in this order."""
    scores = np.asarray(logits, dtype=np.float64) if params.greedy else log_probs(logits, params)
    if not params.greedy:
        scores = scores + gumbel_noise(seed, position, len(logits))
    k = min(k, int(np.isfinite(scores).sum()))
    if k < len(scores):  # every id at or above the k-th best value: ties at the boundary go to the lowest id
        kth = -np.partition(-scores, k - 1)[k - 1]
        top = np.flatnonzero(scores >= kth)
    else:
        top = np.arange(len(scores))
    return [int(t) for t in sorted(top, key=lambda t: (-scores[t], t))][:k]


def tree_depths(drafts: Sequence[DraftToken]) -> tuple[list[int], list[int]]:
    """Each draft's parent index and depth (1 = follows the context); raises
    ValueError on a parent that is not an earlier draft or the root."""
    parents = tree_parents(drafts)
    depth = [0] * len(drafts)
    for i, p in enumerate(parents):
        if not ROOT <= p < i:
            raise ValueError(f"draft {i}: parent {p} is not an earlier draft or the root")
        depth[i] = 1 if p == ROOT else depth[p] + 1
    return parents, depth


def walk_tree(
    drafts: Sequence[DraftToken], parents: Sequence[int], token_after: Callable[[int], int]
) -> tuple[list[Decision], list[int], int]:
    """Decisions, accepted path and next token of a tree, given the target's
    token after each node (``token_after(ROOT)``: after the context)."""
    decisions = []
    for d, p in zip(drafts, parents, strict=True):
        t = token_after(p)
        decisions.append(Decision(t == d.token_id, t))
    path: list[int] = []
    node = ROOT
    while True:
        child = next((i for i, p in enumerate(parents) if p == node and decisions[i].accepted), None)
        if child is None:
            return decisions, path, token_after(node)
        path.append(child)
        node = child


def verify_rows(
    rows: np.ndarray,
    drafts: Sequence[DraftToken],
    params: SamplingParams,
    seed: int,
    start_position: int,
) -> tuple[list[Decision], list[int], int]:
    """Decide a tree of drafts from the target's logits.

    ``rows[0]`` holds the target's logits after the context (for sequence
    position ``start_position``), ``rows[1 + i]`` those after draft ``i``
    and its ancestors. Returns one decision per draft (does it equal the
    target's token after its parent?), the accepted path (draft indices from
    the root: at each step the child equal to the target's token), and the
    target's token after the path (the correction, or the bonus token).
    A chain is the tree where each draft follows the previous one.
    (dsi.backends.torch_sampling.verify_scores decides the same on a torch
    device, every row at once.)
    """
    parents, depth = tree_depths(drafts)
    assert rows.shape[0] == len(drafts) + 1
    cache: dict[int, int] = {}

    def token_after(node: int) -> int:  # the target's token after ``node`` (ROOT: after the context)
        if node not in cache:
            position = start_position + (0 if node == ROOT else depth[node])
            cache[node] = choose(rows[node + 1], params, seed, position)
        return cache[node]

    return walk_tree(drafts, parents, token_after)
