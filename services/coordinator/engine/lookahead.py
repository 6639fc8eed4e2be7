"""Automatic lookahead: how many drafts a chunk carries (and how many target
replicas a DSI generation keeps busy), chosen from what the generation
measures as it runs.

A generation asks for it with ``lookahead = 0`` (``--lookahead auto``). It
measures the drafter's acceptance in this generation (an exponentially
weighted mean over decided drafts, so that it follows text that gets easier or
harder), the drafter's seconds per drafted token, and the target replicas'
seconds per verification (the pool's latency measurements), and every
``REPLAN_EVERY`` committed tokens picks the lookahead ``k`` that minimises the
expected time per token of the strategy's rules:

* **SI** (one chunk at a time): a round drafts ``k`` tokens (``k d``) and
  verifies them (``t``); it commits the accepted drafts and one more,
  ``(1 - a^(k+1)) / (1 - a)`` tokens in expectation. Time per token:
  ``(k d + t) (1 - a) / (1 - a^(k+1))``.
* **DSI** (chunks verified while drafting goes on, ``n`` replicas, one of
  them taken by the frontier step after a restart): the first chunk goes out
  once its ``k`` drafts are there (``k d``); later ones as replicas free up,
  every ``t / (n - 1)`` at most, carrying what was drafted meanwhile, so
  ``k' = max(k, t / ((n - 1) d))`` drafts each. With ``L`` accepted drafts
  before the first rejection (geometric), the chunk holding it is decided one
  verification after its dispatch, so a restart-to-restart round takes
  ``k d + a^k k' d / (1 - a^k') + t`` in expectation and commits ``L + 1``
  tokens: per token ``(1 - a)`` times that, and never more than ``t`` (a
  frontier step always runs: DSI is never slower than non-SI). The generation
  keeps ``ceil(t / (k d)) + 1`` replicas busy at most: more would wait for
  drafts.

These are the rules ``dsi simulate`` plays event by event
(:mod:`dsi.tools.experiments.simulate`); docs/benchmarks.md compares the
choice with the best fixed lookahead there and through the services.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: Lookahead used until the first measurements (and the largest considered by default).
START, LARGEST = 4, 16
#: Committed tokens between two choices.
REPLAN_EVERY = 4
#: Weight of each newly decided draft in the acceptance estimate (about the last 30 drafts count).
ACCEPTANCE_WEIGHT = 1 / 8
#: Weight of a new sample in the drafter's seconds-per-token estimate.
SPEED_WEIGHT = 0.2
#: Lookaheads whose expected time per token is within this fraction of the best count as equally good.
NEAR = 0.01


def si_seconds_per_token(a: float, d: float, t: float, k: int) -> float:
    """Expected seconds per committed token of SI with lookahead ``k``."""
    tokens = k + 1 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)
    return (k * d + t) / tokens


def dsi_seconds_per_token(a: float, d: float, t: float, k: int, n: int, floor: bool = True) -> float:
    """Expected seconds per committed token of DSI with lookahead ``k`` on
    ``n`` replicas; ``floor``: at most ``t`` (what the frontier steps alone give)."""
    later = max(float(k), t / (max(n - 1, 1) * max(d, 1e-9)))  # drafts per chunk after the first
    if a >= 1.0:
        cost = d
    else:
        cost = (1 - a) * (k * d + a**k * later * d / (1 - a**later) + t)
    return min(t, cost) if floor else cost


def best_lookahead(dsi: bool, a: float, d: float, t: float, n: int, largest: int = LARGEST) -> int:
    """The lookahead in 1..``largest`` with the least expected time per token.
    Among those within ``NEAR`` of the least, the largest: fewer, longer
    chunks cost fewer RPCs, which the model leaves out. DSI's choice ignores
    its floor (the frontier steps), which would make every lookahead equal
    when the drafter does not pay."""
    a = min(max(a, 0.0), 0.999)
    if dsi:
        cost = [dsi_seconds_per_token(a, d, t, k, n, floor=False) for k in range(1, largest + 1)]
    else:
        cost = [si_seconds_per_token(a, d, t, k) for k in range(1, largest + 1)]
    best = min(cost)
    return max(k for k, c in enumerate(cost, start=1) if c <= best * (1 + NEAR))


def replicas_needed(d: float, t: float, k: int) -> int:
    """Replicas that keep DSI's chunks of ``k`` drafts from waiting: one
    verification takes ``t``, a chunk is drafted every ``k d``, plus the
    frontier step."""
    return math.ceil(t / max(k * d, 1e-9)) + 1


@dataclass
class LookaheadPlanner:
    """One generation's measurements and its current choice."""

    dsi: bool
    largest: int = LARGEST
    acceptance: float = 0.7  # a prior, until drafts are decided
    seconds_per_draft: float = 0.0  # 0 = not measured yet
    lookahead: int = START
    replicas: int = 0  # 0 = every replica the engine allows
    _since: int = 0

    def decided(self, accepted: bool) -> None:
        self.acceptance += ACCEPTANCE_WEIGHT * (float(accepted) - self.acceptance)

    def drafted(self, tokens: int, seconds: float) -> None:
        """``tokens`` drafted in ``seconds`` (a stream's chunk, after its first)."""
        if tokens <= 0 or seconds <= 0:
            return
        sample = seconds / tokens
        s = self.seconds_per_draft
        self.seconds_per_draft = sample if s == 0 else s + SPEED_WEIGHT * (sample - s)

    def committed(self, measure_target: Callable[[], tuple[float, int]]) -> None:
        """A token was committed; every ``REPLAN_EVERY``, choose again (once
        the drafter and the target have been timed). ``measure_target``: the
        target's seconds per verification and the replicas there are."""
        self._since += 1
        if self._since < REPLAN_EVERY or not self.seconds_per_draft:
            return
        t, replicas = measure_target()
        if not t:
            return
        self._since = 0
        d = self.seconds_per_draft
        self.lookahead = best_lookahead(self.dsi, self.acceptance, d, t, replicas, self.largest)
        self.replicas = min(replicas, replicas_needed(d, t, self.lookahead)) if self.dsi else 0
