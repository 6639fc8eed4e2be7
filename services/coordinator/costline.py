"""Seconds as a line in tokens (a verification's, a pass's, a draft stream's
start), fitted as samples come: what the coordinator's lookahead planner and
its replica pool both measure with."""

from __future__ import annotations

#: Weight of a new sample in a ``Line`` (a verification's or a draft stream's seconds by its tokens).
COST_WEIGHT = 0.03
#: How widely (variance, tokens squared) a ``Line``'s samples must spread before it gets a slope.
MIN_SPREAD = 0.5


class Line:
    """Seconds as a line in tokens, fitted by exponentially weighted least
    squares (a new sample weighs ``COST_WEIGHT``). Used for a verification's
    seconds by the tokens it computes (its drafts, and what its replica had
    not cached: ``k + 1`` for a chunk of ``k`` drafts on a replica that holds
    the rest) and a draft stream's seconds to its first chunk by the drafts
    in it. On a GPU a verification's line is nearly flat (reading the weights
    sets a pass's time); on a CPU every token costs (a demo pair step: about
    6 ms, and 0.2-0.8 ms more per draft). A stream's line starts at what
    starting it costs (the call, the drafter's prefill), paid once per
    stream: SI pays it every round. Until the samples spread over several
    sizes (the lookahead changes; DSI's chunks and frontier steps differ)
    the slope is unknown; it never falls below zero, nor the line at zero
    tokens."""

    __slots__ = ("_w", "_x", "_xx", "_xy", "_y")

    def __init__(self) -> None:
        # Weighted sums (plain floats: a sample per verification, on the coordinator's hot path):
        # weight, tokens, seconds, tokens^2, tokens * seconds.
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def copy(self) -> Line:
        other = Line()
        other._w, other._x, other._y, other._xx, other._xy = self._w, self._x, self._y, self._xx, self._xy
        return other

    @property
    def measured(self) -> bool:
        return bool(self._w)

    def add(self, tokens: int, seconds: float) -> None:
        keep = 1 - COST_WEIGHT
        self._w = keep * self._w + 1.0
        self._x = keep * self._x + tokens
        self._y = keep * self._y + seconds
        self._xx = keep * self._xx + tokens * tokens
        self._xy = keep * self._xy + tokens * seconds

    def fit(self, slope: float | None = None, through_zero: bool = False) -> tuple[float, float]:
        """Seconds at 0 tokens, and per token: the least-squares line, or
        the one with the given ``slope``. Samples that do not spread give a
        flat line (their mean seconds whatever the tokens) or, with
        ``through_zero``, their seconds per token (nothing at 0)."""
        w = self._w
        x, y, xx, xy = self._x / w, self._y / w, self._xx / w, self._xy / w
        if slope is None:
            spread = xx - x * x
            if spread >= MIN_SPREAD:
                slope = max(0.0, (xy - x * y) / spread)
            else:
                slope = y / x if through_zero and x > 0 else 0.0
        slope = min(slope, y / x) if x > 0 else slope  # no negative seconds at 0 tokens
        return y - slope * x, slope
