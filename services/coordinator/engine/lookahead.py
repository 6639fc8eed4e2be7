"""Automatic lookahead: how many drafts a chunk carries (and how many target
replicas a DSI generation keeps busy), chosen from what the generation
measures as it runs.

A generation asks for it with ``lookahead = 0`` (``--lookahead auto``). It
measures the drafter's acceptance in this generation (:class:`AcceptanceEstimate`:
over up to the last ``MAX_RUN`` decided drafts, and only over those since the
text last changed, so it follows text that gets easier or harder within a few
drafts), the drafter's seconds per drafted token, and the target replicas'
seconds per verification (the pool's latency measurements). Whenever the
strategy asks for the lookahead after a new measurement, it picks the ``k``
that minimises the expected time per token of the strategy's rules:

* **SI** (one chunk at a time): a round drafts ``k`` tokens (``k d``) and
  verifies them (``t``); it commits the accepted drafts and one more,
  ``(1 - a^(k+1)) / (1 - a)`` tokens in expectation. Time per token:
  ``(k d + t) (1 - a) / (1 - a^(k+1))``.
* **DSI** (chunks verified while drafting goes on, ``n`` replicas, one of
  them taken by the frontier step after a restart): the first chunk goes out
  once its ``k`` drafts are there (``k d``); later ones as replicas free up,
  every ``t / (n - 1)`` at most, carrying what was drafted meanwhile, so
  ``k' = max(k, t / ((n - 1) d'))`` drafts each, where ``d'`` is ``d`` or,
  when drafting is held back by its lead limit (``k (n + 2)`` drafts ahead of
  the committed text, each committed about ``k d + t`` after it is drafted),
  ``(k d + t) / (k (n + 2))``. With ``L`` accepted drafts before the first
  rejection (geometric), the chunk holding it is decided one verification
  after its dispatch, so a restart-to-restart round takes
  ``k d + a^k k' d' / (1 - a^k') + t`` in expectation and commits ``L + 1``
  tokens: per token ``(1 - a)`` times that, and never more than ``t`` (a
  frontier step always runs: DSI is never slower than non-SI). The generation
  keeps ``ceil(t / (k d)) + 1`` replicas busy at most: more would wait for
  drafts. Each replica advances the text by about ``k`` per verification, so
  a token costs at least ``t / (n k)``.

The acceptance is not known, only measured, and a wrong guess costs
unevenly: SI with chunks too long for the text pays for drafts thrown away,
and a few dozen drafts cannot tell 0.8 from 0.9. So the choice minimises the
time per token *expected over what the acceptance may be*: the measured
drafts' posterior. Measurements that agree give the choice for their mean;
few or mixed ones a choice that does not lose much whichever acceptance is
true. Where no lookahead pays (DSI on text the drafter cannot guess: the
frontier steps set the pace whatever ``k``), DSI takes the one that would be
best if the text changed to anything: it keeps it until drafts show the
change (on text alternating between acceptance 0.95 and 0.1 that is ``k = 2``
rather than 1, 0.5% faster over the whole text; mixing that chance of a
change into every choice instead cost 1-2% on steady text).

These are the rules ``dsi simulate`` plays event by event
(:mod:`dsi.tools.experiments.simulate`); docs/benchmarks.md compares the
choice with the best fixed lookahead there and through the services.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: Lookahead used until the first measurements (and the largest considered by default).
START, LARGEST = 4, 16
#: Most decided drafts the acceptance is measured over, and the chance that it changes at any one.
MAX_RUN, HAZARD = 64, 1 / 64
#: Acceptances the expected cost is evaluated at (midpoints of equal bins of 0..1).
GRID = (np.arange(40) + 0.5) / 40
_LOG_GRID, _LOG1M_GRID = np.log(GRID), np.log1p(-GRID)
#: Chunks drafting may run ahead beyond one per replica (the engine's ``lead_chunks``).
LEAD_CHUNKS = 2
#: Weight of a new sample in the drafter's seconds-per-token estimate.
SPEED_WEIGHT = 0.2
#: Lookaheads whose expected time per token is within this fraction of the best count as equally good.
NEAR = 0.01


#: An acceptance, or an array of them (the cost functions broadcast).
Acceptance = float | np.ndarray


def si_seconds_per_token(a: Acceptance, d: float, t: float, k: int | np.ndarray) -> Acceptance:
    """Expected seconds per committed token of SI with lookahead ``k``
    (``a``, ``k``: numbers or arrays that broadcast; ``a`` below 1)."""
    return (k * d + t) * (1 - a) / (1 - a ** (k + 1))


def dsi_seconds_per_token(
    a: Acceptance, d: float, t: float, k: int | np.ndarray, n: int, floor: bool = True, lead: int = LEAD_CHUNKS
) -> Acceptance:
    """Expected seconds per committed token of DSI with lookahead ``k`` on
    ``n`` replicas (``a`` below 1); ``floor``: at most ``t`` (what the
    frontier steps alone give). Drafting runs at most ``k (n + lead)``
    drafts ahead of the committed text (the engine's limit), and a draft is
    committed about ``k d + t`` after it is drafted, so a small ``k`` holds
    drafting back to ``k (n + lead)`` drafts per ``k d + t``; and a chunk
    leaves as soon as it has ``k`` drafts, so each of the ``n`` replicas
    advances the text by about ``k`` per verification: ``t / (n k)`` per
    token at least."""
    d = max(d, 1e-9)
    paced = np.maximum(d, (k * d + t) / (k * (n + lead)))  # drafting held back by its lead limit
    later = np.maximum(k, t / (max(n - 1, 1) * paced))  # drafts per chunk after the first
    cost = np.maximum((1 - a) * (k * d + a**k * later * paced / (1 - a**later) + t), t / (n * k))
    return np.minimum(t, cost) if floor else cost


def _pick(costs: np.ndarray, *then: np.ndarray) -> int:
    """The lookahead (1-based index) with the least cost; among those within
    ``NEAR`` of it, the ones within ``NEAR`` of the least of each ``then``
    cost in turn; of what is left, the largest: fewer, longer chunks cost
    fewer RPCs, which the model leaves out."""
    near = costs <= costs.min() * (1 + NEAR)
    for cost in then:
        near &= cost <= cost[near].min() * (1 + NEAR)
    return int(np.flatnonzero(near)[-1]) + 1


def _costs(dsi: bool, a: np.ndarray, d: float, t: float, n: int, largest: int, floor: bool = True) -> np.ndarray:
    """Lookahead 1..``largest`` (rows) by acceptance ``a`` (columns): the cost."""
    k = np.arange(1, largest + 1, dtype=float)[:, None]
    if dsi:
        return np.asarray(dsi_seconds_per_token(a[None, :], d, t, k, n, floor))
    return np.asarray(si_seconds_per_token(a[None, :], d, t, k))


def _choose(dsi: bool, a: np.ndarray, weights: np.ndarray, d: float, t: float, n: int, largest: int) -> int:
    """The lookahead with the least cost expected over ``weights`` on ``a``.
    DSI's floor (the frontier steps set the pace) makes lookaheads equal when
    the drafter does not pay (text it cannot guess); among those, the one
    that would be best if the text changed to anything (the lookahead stays
    until drafts show the change), then the one that would be best without
    the floor (a one-draft chunk issued next to the frontier step decides
    the position after it)."""
    costs = _costs(dsi, a, d, t, n, largest)
    if not dsi:
        return _pick(costs @ weights)
    unfloored = _costs(dsi, a, d, t, n, largest, False) @ weights
    if _costs(dsi, np.array([a @ weights]), d, t, n, largest).min() >= t / (1 + NEAR):  # no k pays now
        return _pick(costs @ weights, costs.mean(axis=1), unfloored)
    return _pick(costs @ weights, unfloored)


def best_lookahead(dsi: bool, a: float, d: float, t: float, n: int, largest: int = LARGEST) -> int:
    """The lookahead in 1..``largest`` with the least expected time per token
    when the acceptance is ``a`` for sure."""
    return _choose(dsi, np.array([min(max(a, 0.0), 0.999)]), np.ones(1), d, t, n, largest)


class AcceptanceEstimate:
    """What the acceptance may be, from the decided drafts, when it may
    change along the text: Bayesian online change-point detection (Adams and
    MacKay, 2007) over accept/reject coins. It keeps, for every run length
    ``r`` up to ``MAX_RUN``, how likely it is that the last ``r`` drafts share
    one acceptance (the text changed before them, with probability
    ``HAZARD`` at every draft); each such run gives a Beta posterior (uniform
    prior) on the acceptance, and :meth:`weights` mixes them. Steady text
    gives the long runs all the weight, so the estimate rests on up to
    ``MAX_RUN`` drafts; a few surprising coins in a row move the weight to a
    short run at once, so the estimate follows a change within a few drafts."""

    def __init__(self) -> None:
        self.history: deque[bool] = deque(maxlen=MAX_RUN)  # the last decided drafts, oldest first
        self.runs = np.ones(1)  # probability of run length 0, 1, .. len(history)

    def copy(self) -> AcceptanceEstimate:
        other = AcceptanceEstimate()
        other.history.extend(self.history)
        other.runs = self.runs.copy()
        return other

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Accepted and decided drafts among the last ``r``, for every run length ``r``."""
        recent = np.fromiter(reversed(self.history), float, len(self.history))
        return np.concatenate(([0.0], np.cumsum(recent))), np.arange(len(recent) + 1, dtype=float)

    def add(self, accepted: bool) -> None:
        acc, dec = self._counts()
        p = (acc + 1) / (dec + 2)  # each run's predicted probability of an acceptance
        joint = self.runs * (p if accepted else 1 - p)
        runs = np.concatenate(([joint.sum() * HAZARD], joint * (1 - HAZARD)))
        if len(runs) > MAX_RUN + 1:  # a run longer than MAX_RUN counts as MAX_RUN long
            runs[-2] += runs[-1]
            runs = runs[:-1]
        self.runs = runs / runs.sum()
        self.history.append(accepted)

    def mean(self) -> float:
        acc, dec = self._counts()
        return float(self.runs @ ((acc + 1) / (dec + 2)))

    def weights(self) -> np.ndarray:
        """How likely each acceptance of :data:`GRID` is now (summing to 1)."""
        acc, dec = self._counts()
        log = acc[:, None] * _LOG_GRID + (dec - acc)[:, None] * _LOG1M_GRID
        pdf = np.exp(log - log.max(axis=1, keepdims=True))
        w = self.runs @ (pdf / pdf.sum(axis=1, keepdims=True))
        return w / w.sum()


def robust_lookahead(dsi: bool, weights: np.ndarray, d: float, t: float, n: int, largest: int = LARGEST) -> int:
    """The lookahead in 1..``largest`` with the least time per token expected
    over acceptances distributed as ``weights`` on :data:`GRID`."""
    return _choose(dsi, GRID, weights, d, t, n, largest)


def replicas_needed(d: float, t: float, k: int) -> int:
    """Replicas that keep DSI's chunks of ``k`` drafts from waiting: one
    verification takes ``t``, a chunk is drafted every ``k d``, plus the
    frontier step."""
    return math.ceil(t / max(k * d, 1e-9)) + 1


@dataclass
class LookaheadPlanner:
    """One generation's measurements and its current choice.
    ``measure_target``: the target's seconds per verification (0 = not
    measured yet) and the replicas there are."""

    dsi: bool
    measure_target: Callable[[], tuple[float, int]]
    largest: int = LARGEST
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    seconds_per_draft: float = 0.0  # 0 = not measured yet
    _lookahead: int = START
    _replicas: int = 0  # 0 = every replica the engine allows
    _timed_later: bool = field(default=False, repr=False)  # timed a stream's chunk after its first
    _stale: bool = field(default=True, repr=False)  # measured something since the last choice

    def resume(self, previous: LookaheadPlanner | None) -> None:
        """Start from what an earlier generation with the same drafter and
        targets measured (a copy: each goes on measuring on its own)."""
        if previous is None:
            return
        self.estimate = previous.estimate.copy()
        self.seconds_per_draft, self._timed_later = previous.seconds_per_draft, previous._timed_later
        self._stale = True

    @property
    def measured(self) -> bool:
        """Whether it has measured anything worth starting the next generation from."""
        return bool(self.seconds_per_draft and self.estimate.history)

    @property
    def acceptance(self) -> float:
        """The measured acceptance (the posterior mean)."""
        return self.estimate.mean()

    def decided(self, accepted: bool) -> None:
        self.estimate.add(accepted)
        self._stale = True

    def drafted(self, tokens: int, seconds: float, first: bool = False) -> None:
        """``tokens`` drafted in ``seconds``. A stream's ``first`` chunk
        includes a prefill: it counts only until a later chunk has been timed
        (after a rejection a stream is often cancelled before its second)."""
        if tokens <= 0 or seconds <= 0 or (first and self._timed_later):
            return
        sample = seconds / tokens
        s = 0.0 if not first and not self._timed_later else self.seconds_per_draft
        self._timed_later = self._timed_later or not first
        self.seconds_per_draft = sample if s == 0 else s + SPEED_WEIGHT * (sample - s)
        self._stale = True

    @property
    def lookahead(self) -> int:
        """Drafts per chunk now."""
        self._plan()
        return self._lookahead

    @property
    def replicas(self) -> int:
        """Target replicas to keep busy now (0: as many as the engine allows)."""
        self._plan()
        return self._replicas

    def _plan(self) -> None:
        """Choose again if something was measured since the last choice (once
        the drafter and the target have been timed)."""
        if not self._stale or not self.seconds_per_draft:
            return
        t, replicas = self.measure_target()
        if not t:
            return
        self._stale = False
        d = self.seconds_per_draft
        self._lookahead = robust_lookahead(self.dsi, self.estimate.weights(), d, t, replicas, self.largest)
        self._replicas = min(replicas, replicas_needed(d, t, self._lookahead)) if self.dsi else 0
