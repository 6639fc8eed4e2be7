"""Command-line argument types shared by the services and the tools."""

from __future__ import annotations

import argparse

from dsi.domain.errors import InvalidArgument
from dsi.domain.types import TreeShape


def tree_shape(text: str) -> TreeShape:
    """``chain``, ``W`` or ``WxD`` (see :class:`TreeShape`)."""
    try:
        return TreeShape.parse(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def lookahead(text: str) -> int:
    """A lookahead: an integer >= 1, or ``auto`` (0: chosen as the generation runs)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a lookahead is an integer >= 1 or 'auto', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a lookahead is an integer >= 1 or 'auto', got {n}")
    return n
