"""The decision rule of dsi.domain.sampling, in torch, on the model's device.

A target that decides on its device moves only token ids to the host (8
bytes per row) instead of whole rows of logits (4 bytes x vocabulary per
row: 512 KB for a 128k vocabulary). Same rule, same keyed randomness:

- the noise hash is the same 32-bit MurmurHash3 finaliser of
  ``(seed, position, token id)``, in int64 arithmetic with masking (torch has
  no uint32 multiplication on every device; products stay below 2^49), so
  the uniforms are bit-identical to :func:`dsi.domain.sampling.keyed_uniforms`;
- warping (temperature, top-k, top-p) and the noisy scores are float64, as
  on the host; ``log`` and the top-p normalisation may round differently
  from numpy in the last bit, which can only matter for a near-exact tie
  between two noisy scores (tests compare decisions on random logits);
- greedy is ``argmax`` of the raw logits (ties to the lowest id, as numpy
  and HF generate).

Devices without float64 (MPS) cannot run this: :func:`supported` says so and
the backend decides on the host there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsi.domain import sampling
from dsi.domain.types import ROOT, Decision, DraftToken, SamplingParams

_M32 = 0xFFFFFFFF
_INV_2_53 = 1.0 / (1 << 53)


def supported(device: torch.device) -> bool:
    """Whether ``device`` has the int64 and float64 arithmetic the rule needs."""
    return device.type != "mps"


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` < 2^32 (see sampling._mul32)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


_ID_HASH: dict[tuple[str, int], torch.Tensor] = {}


def _id_hash(vocab_size: int, device: torch.device) -> torch.Tensor:
    """``token id x golden mod 2^32`` for every id: the part of the hash that
    depends on nothing else, computed once per device and vocabulary."""
    key = (str(device), vocab_size)
    if key not in _ID_HASH:
        ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
        _ID_HASH[key] = _mul32(ids, sampling._GOLDEN32)
    return _ID_HASH[key]


def keyed_uniforms(seed: int, positions: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(len(positions), vocab) uniforms in (0, 1), bit-identical to
    :func:`dsi.domain.sampling.keyed_uniforms` for each position."""
    keys = torch.tensor([sampling.noise_keys(seed, p) for p in positions], dtype=torch.int64, device=device)
    x = _fmix32(_id_hash(vocab_size, device)[None, :] ^ keys[:, 0:1])
    hi = _fmix32(x ^ keys[:, 1:2])
    lo = _fmix32(x ^ keys[:, 2:3]) >> 11
    return ((hi << 21) | lo).to(torch.float64).add_(0.5).mul_(_INV_2_53)


def gumbel_noise(seed: int, positions: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(len(positions), vocab) standard Gumbel noise ``G(seed, position, x)``."""
    return keyed_uniforms(seed, positions, vocab_size, device).log_().neg_().log_().neg_()


def log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Row-wise warped log-probabilities up to a constant (-inf = excluded), float64,
    as :func:`dsi.domain.sampling.log_probs`."""
    x = logits.to(torch.float64) / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p >= 1.0:
        return x
    p = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    p = p / p.sum(dim=-1, keepdim=True)
    sorted_neg, order = torch.sort(-p, dim=-1, stable=True)
    cum = torch.cumsum(-sorted_neg, dim=-1)
    target = torch.full((p.shape[0], 1), params.top_p, dtype=torch.float64, device=p.device)
    keep = (torch.searchsorted(cum, target, side="left") + 1).clamp_(max=vocab)
    ranks = torch.arange(vocab, device=p.device)[None, :]
    mask = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order, ranks < keep)
    p = torch.where(mask, p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.log(p / p.sum(dim=-1, keepdim=True))


def noisy_scores(logits: torch.Tensor, params: SamplingParams, seed: int, positions: Sequence[int]) -> torch.Tensor:
    """The scores whose argmax is the rule's choice, one row per position."""
    if params.greedy:
        return logits
    return log_probs(logits, params) + gumbel_noise(seed, positions, logits.shape[-1], logits.device)


def choose_rows(logits: torch.Tensor, params: SamplingParams, seed: int, positions: Sequence[int]) -> torch.Tensor:
    """The rule's token for each row of ``logits`` (row i at ``positions[i]``),
    as an int64 tensor on the same device."""
    return torch.argmax(noisy_scores(logits, params, seed, positions), dim=-1)


def top_candidates(logits: torch.Tensor, params: SamplingParams, seed: int, position: int, k: int) -> list[int]:
    """:func:`dsi.domain.sampling.top_candidates` of one row on its device:
    the ``k`` best guesses, best first, ties to the lowest id; only ``k``
    ids reach the host."""
    scores = noisy_scores(logits[None, :], params, seed, [position])[0]
    if k == 1:
        return [int(torch.argmax(scores))]
    finite = int(torch.isfinite(scores).sum())
    k = min(k, finite)
    # the k best by value, then ties broken by id: a stable descending sort of the candidates
    # at or above the k-th value (there may be more than k when values tie at the boundary)
    kth = torch.topk(scores, k).values[-1]
    ids = torch.nonzero(scores >= kth).flatten()
    order = torch.sort(scores[ids], descending=True, stable=True).indices[:k]
    return ids[order].tolist()


def verify_scores(
    logits: torch.Tensor,
    drafts: Sequence[DraftToken],
    params: SamplingParams,
    seed: int,
    start_position: int,
    moved: list[int] | None = None,
) -> tuple[list[Decision], list[int], int]:
    """:func:`dsi.domain.sampling.verify_rows` with the rows on a torch
    device: every row's token is decided there in one batch, and only those
    ids (8 bytes per row) come to the host. ``moved``, when given, gets the
    number of bytes copied to the host appended."""
    parents, depth = sampling.tree_depths(drafts)
    assert logits.shape[0] == len(drafts) + 1
    positions = [start_position, *(start_position + d for d in depth)]
    chosen = choose_rows(logits, params, seed, positions)
    tokens = chosen.tolist()
    if moved is not None:
        moved.append(chosen.element_size() * chosen.numel())

    def token_after(node: int) -> int:
        return tokens[0 if node == ROOT else node + 1]

    return sampling.walk_tree(drafts, parents, token_after)


def host_rows(scores: Any) -> Any:
    """A tensor's rows as a float32 numpy array on the host (the whole rows)."""
    return scores.float().cpu().numpy()
