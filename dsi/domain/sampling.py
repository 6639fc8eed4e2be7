"""Sampling math: logit warping, drafting proposals and exact speculative
rejection sampling with sparse draft distributions.

Everything here is plain numpy in float64 on the CPU, whatever device produced
the logits, so a decision does not depend on where it is computed.

Randomness is *keyed*: the uniform number used for a decision at sequence
position ``i`` is a hash of ``(seed, i, stream)``. The decision at a position
therefore does not depend on which target replica makes it, and a position's
random numbers are independent of those of every other position, which is what
losslessness needs (each position is decided exactly once, see DESIGN.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

from dsi.domain.types import Decision, DraftToken, SamplingParams, SparseDist

# Independent random streams per position.
STREAM_ACCEPT = 1  # target: accept/reject test of a draft token
STREAM_SAMPLE = 2  # target: residual sample after a rejection, or a plain sample
STREAM_DRAFT = 3  # drafter: sampling the proposal

_U64 = (1 << 64) - 1


def keyed_uniform(seed: int, position: int, stream: int) -> float:
    """A uniform number in [0, 1) determined by (seed, position, stream)."""
    digest = hashlib.blake2b(struct.pack("<QQQ", seed & _U64, position & _U64, stream & _U64), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


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


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF sample from (unnormalised, non-negative) ``probs``; never
    returns an index of probability 0."""
    cum = np.cumsum(probs)
    idx = int(np.searchsorted(cum, u * cum[-1], side="right"))
    return min(idx, probs.size - 1)


def greedy_token(scores: np.ndarray) -> int:
    """Argmax; ties go to the lowest id, like torch.argmax in HF generate."""
    return int(np.argmax(scores))


def truncate(q: np.ndarray, top_k: int) -> SparseDist:
    """Keep the ``top_k`` most likely entries of dense ``q`` as a SparseDist.

    The probabilities are rounded to float32 (what goes on the wire) and
    renormalised, so the drafter samples from exactly the distribution the
    target will see.
    """
    nz = np.flatnonzero(q > 0)
    if top_k and nz.size > top_k:
        nz = nz[np.argpartition(q[nz], -top_k)[-top_k:]]
    ids = np.sort(nz)
    kept = q[ids]
    return SparseDist.from_wire(ids, (kept / kept.sum()).astype(np.float32), q.size)


def propose(q: np.ndarray, params: SamplingParams, top_k: int, seed: int, position: int) -> DraftToken:
    """The drafter's choice at ``position`` from its dense distribution ``q``.

    Greedy: the argmax, with a one-point distribution. Sampling: a sample from
    the top-k truncation of ``q``, sent along with the token.
    """
    if params.greedy:
        tok = greedy_token(q)
        return DraftToken(tok, SparseDist(np.array([tok], dtype=np.int64), np.ones(1)))
    dist = truncate(q, top_k)
    idx = sample_index(dist.probs, keyed_uniform(seed, position, STREAM_DRAFT))
    return DraftToken(int(dist.token_ids[idx]), dist)


def decide(p: np.ndarray, draft: DraftToken, seed: int, position: int) -> Decision:
    """Speculative sampling at one position: accept ``draft`` with probability
    min(1, p(x)/q(x)), else sample from normalize(max(0, p - q))."""
    assert draft.dist is not None, "sampling needs the draft distribution"
    x = draft.token_id
    qx = draft.dist.prob(x)
    if keyed_uniform(seed, position, STREAM_ACCEPT) * qx < p[x]:
        return Decision(True, x)
    residual = p.copy()
    residual[draft.dist.token_ids] -= draft.dist.probs
    np.maximum(residual, 0.0, out=residual)
    if residual.sum() <= 0.0:  # only reachable through rounding: p == q
        residual = p
    return Decision(False, sample_index(residual, keyed_uniform(seed, position, STREAM_SAMPLE)))


def verify_rows(
    rows: np.ndarray,
    drafts: Sequence[DraftToken],
    params: SamplingParams,
    seed: int,
    start_position: int,
) -> tuple[list[Decision], int, int]:
    """Decide every draft position from the target's logits.

    ``rows[i]`` holds the target's logits for sequence position
    ``start_position + i`` (``len(drafts) + 1`` rows). Returns the decisions,
    the number of leading accepted drafts, and the token after them.
    """
    m = len(drafts)
    assert rows.shape[0] == m + 1
    decisions: list[Decision] = []
    rejected_at = -1
    for i, d in enumerate(drafts):
        if params.greedy:
            best = greedy_token(rows[i])
            dec = Decision(best == d.token_id, best)
        else:
            dec = decide(warp(rows[i], params), d, seed, start_position + i)
        if not dec.accepted and rejected_at < 0:
            rejected_at = i
        decisions.append(dec)
    if rejected_at >= 0:
        return decisions, rejected_at, decisions[rejected_at].token_id
    return decisions, m, next_token(rows[m], params, seed, start_position + m)


def next_token(row: np.ndarray, params: SamplingParams, seed: int, position: int) -> int:
    """The target's own choice at ``position`` (no draft there)."""
    if params.greedy:
        return greedy_token(row)
    return sample_index(warp(row, params), keyed_uniform(seed, position, STREAM_SAMPLE))
