"""Model backends and the factory that picks one from a model spec.

A spec is either ``synthetic:...`` (see :mod:`dsi.backends.synthetic`) or the
path of a local Hugging Face model directory.
"""

from __future__ import annotations

from dsi.backends.base import DrafterModel, LocalDrafter, LocalTarget, TargetModel

__all__ = ["LocalDrafter", "LocalTarget", "is_synthetic", "load_drafter_model", "load_target_model"]


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def load_target_model(spec: str, device: str = "cpu", dtype: str = "auto") -> TargetModel:
    if is_synthetic(spec):
        from dsi.backends.synthetic import SyntheticTarget

        return SyntheticTarget(spec)
    from dsi.backends.hf import HFTarget

    return HFTarget(spec, device, dtype)


def load_drafter_model(spec: str, device: str = "cpu", dtype: str = "auto") -> DrafterModel:
    if is_synthetic(spec):
        from dsi.backends.synthetic import SyntheticDrafter

        return SyntheticDrafter(spec)
    from dsi.backends.hf import HFDrafter

    return HFDrafter(spec, device, dtype)
