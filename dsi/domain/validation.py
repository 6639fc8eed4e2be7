"""Checks of request fields against a model's vocabulary and a service's
limits. Each failure raises :class:`~dsi.domain.errors.InvalidArgument` with a message
that says what is wrong."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dsi.domain.errors import InvalidArgument
from dsi.domain.types import ROOT, DraftToken

MAX_SESSION_ID_LENGTH = 128


def check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id must not be empty")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise InvalidArgument(f"session_id is longer than {MAX_SESSION_ID_LENGTH} characters")


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    if len(ids) == 0:
        return
    if isinstance(ids, list) and 0 <= min(ids) and max(ids) < vocab_size:  # the common case, without an array
        return
    arr = np.asarray(ids, dtype=np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"{what}[{i}] = {int(arr[i])} is outside the vocabulary (valid ids are 0..{vocab_size - 1})"
        )


def check_context(
    context: Sequence[int], vocab_size: int, max_context: int, extra: int = 0, extra_what: str = "draft tokens"
) -> None:
    """A non-empty context of valid ids that leaves room for ``extra`` tokens."""
    check_token_ids(context, vocab_size, "context_token_ids")
    check_context_size(len(context), max_context, extra, extra_what)


def check_context_size(n: int, max_context: int, extra: int = 0, extra_what: str = "draft tokens") -> None:
    """A non-empty context of ``n`` tokens that leaves room for ``extra`` tokens."""
    if n == 0:
        raise InvalidArgument("context_token_ids must not be empty")
    if n + extra > max_context:
        raise InvalidArgument(
            f"context of {n} tokens"
            + (f" plus {extra} {extra_what}" if extra else "")
            + f" exceeds the model's limit of {max_context} tokens"
        )


def check_drafts(drafts: Sequence[DraftToken], vocab_size: int, max_draft_tokens: int) -> None:
    if len(drafts) > max_draft_tokens:
        raise InvalidArgument(f"{len(drafts)} draft tokens exceed the limit of {max_draft_tokens}")
    check_token_ids([d.token_id for d in drafts], vocab_size, "draft_tokens")
    for i, d in enumerate(drafts):
        if d.parent is not None and not ROOT <= d.parent < i:
            raise InvalidArgument(
                f"draft_tokens[{i}].parent = {d.parent}: a parent must be an earlier draft token or -1 (the context)"
            )


def check_lookahead(lookahead: int, max_lookahead: int) -> None:
    if lookahead < 1 or lookahead > max_lookahead:
        raise InvalidArgument(f"lookahead must lie in 1..{max_lookahead}, got {lookahead}")


def check_decode(max_tokens: int, drafts: Sequence[DraftToken]) -> None:
    """A Decode request: at least one token, and a start without drafts."""
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
    if drafts:
        raise InvalidArgument("a Decode request's start must have no draft tokens")
