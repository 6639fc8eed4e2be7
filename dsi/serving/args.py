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
