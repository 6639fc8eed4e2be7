"""Model backends and the factory that picks one from a model spec.

A spec is either ``synthetic:...`` (see :mod:`dsi.backends.synthetic`) or the
path of a local Hugging Face model directory. A drafter may also be
``ngram:...``: prompt lookup, no model (see :mod:`dsi.backends.ngram`).
"""

from __future__ import annotations

import argparse
from typing import Any

from dsi.backends.base import DrafterModel, LocalDrafter, LocalTarget, TargetModel
from dsi.backends.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_TOKENS, BatchLimits
from dsi.backends.ngram import NgramDrafter, is_ngram

__all__ = [
    "BatchLimits",
    "LocalDrafter",
    "LocalTarget",
    "NgramDrafter",
    "add_batch_arguments",
    "add_model_arguments",
    "apply_cpu_threads",
    "batch_limits_from_args",
    "is_ngram",
    "is_synthetic",
    "load_drafter",
    "load_drafter_model",
    "load_target_model",
    "non_negative_int",
]


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def load_target_model(spec: str, device: str = "cpu", dtype: str = "auto") -> TargetModel:
    if is_synthetic(spec):
        from dsi.backends.synthetic import SyntheticTarget

        return SyntheticTarget(spec)
    from dsi.backends.hf import HFTarget

    return HFTarget(spec, device, dtype)


def load_drafter_model(spec: str, device: str = "cpu", dtype: str = "auto") -> DrafterModel:
    if is_ngram(spec):
        raise ValueError(f"{spec!r} is a drafter without a model: make it with NgramDrafter")
    if is_synthetic(spec):
        from dsi.backends.synthetic import SyntheticDrafter

        return SyntheticDrafter(spec)
    from dsi.backends.hf import HFDrafter

    return HFDrafter(spec, device, dtype)


def load_drafter(spec: str, device: str = "cpu", dtype: str = "auto", **kw: Any) -> LocalDrafter | NgramDrafter:
    """An in-process drafter for any drafter spec: prompt lookup for
    ``ngram:...``, else a :class:`LocalDrafter` over the model (``kw``: its
    limits)."""
    if is_ngram(spec):
        return NgramDrafter(spec, kw.get("max_lookahead", 64))
    return LocalDrafter(load_drafter_model(spec, device, dtype), **kw)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options of ``dsi target`` and ``dsi drafter``."""
    p.add_argument(
        "--model",
        default="synthetic",
        help="model directory or synthetic spec; for a drafter also ngram[:n=3,min_n=2,k=8] (prompt lookup, no model)"
        " (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda:N or mps (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16, float64 (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="CPU threads for the model's operators (0 = torch's default: one per core). Set it when several"
        " model servers share a machine's cores, or to the container's CPU limit",
    )


def add_batch_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--max-batch`` / ``--max-batch-tokens`` (continuous batching, :mod:`dsi.backends.batching`)."""
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"{what} of different sessions that may share one forward pass (1 = no batching; default: %(default)s)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        metavar="N",
        help="tokens one forward pass may compute (a larger request runs alone; default: %(default)s)",
    )


def batch_limits_from_args(args: argparse.Namespace) -> BatchLimits:
    return BatchLimits(args.max_batch, args.max_batch_tokens)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def apply_cpu_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when asked (0 leaves torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
