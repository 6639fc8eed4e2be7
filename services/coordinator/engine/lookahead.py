"""Automatic lookahead: how many drafts a chunk carries (and how many target
replicas a DSI generation keeps busy), chosen from what the generation
measures as it runs.

A generation asks for it with ``lookahead = 0`` (``--lookahead auto``). It
measures the drafter's acceptance in this generation (:class:`AcceptanceEstimate`:
over up to the last ``MAX_RUN`` decided drafts, and only over those since the
text last changed, so it follows text that gets easier or harder within a few
drafts), the drafter's speed (:class:`Line`: a draft stream's start ``s``,
the call and a prefill, and its seconds per draft ``d``), and a
verification's seconds by the tokens it computes (a :class:`Line` over this
generation's verifications: ``t`` for ``k`` drafts; before the first, the
pool's latency measurements). Whenever the strategy asks for the lookahead
after a new measurement, it picks the ``k`` that minimises the expected time
per token of the strategy's rules:

* **SI** (one chunk at a time): a round starts a stream and drafts ``k``
  tokens (``s + k d``) and verifies them (``t``); it commits the accepted
  drafts and one more, ``(1 - a^(k+1)) / (1 - a)`` tokens in expectation.
  Time per token: ``(s + k d + t) (1 - a) / (1 - a^(k+1))``.
* **DSI** (chunks verified while drafting goes on, ``n`` replicas, one of
  them taken by the frontier step after a restart): the first chunk goes out
  once its ``k`` drafts are there and a replica is free, ``max(s + k d,
  t / (2 n))`` (the other replicas may still run the cancelled chunks' passes
  to their end; half of ``t / n`` is the event simulator's wait, and drafts
  that take less than it cost nothing); later ones as replicas free up,
  every ``t / (n - 1)`` at most, carrying what was drafted meanwhile, so
  ``k' = max(k, t / ((n - 1) d'))`` drafts each, where ``d'`` is ``d`` or,
  when drafting is held back by its lead limit (``k (n + 2)`` drafts ahead of
  the committed text, each committed about ``s + k d + t`` after it is drafted),
  ``(s + k d + t) / (k (n + 2))``. With ``L`` accepted drafts before the first
  rejection (geometric), the chunk holding it is decided one verification
  after its dispatch, so a restart-to-restart round takes
  ``first + a^k k' d' / (1 - a^k') + t`` in expectation and commits ``L + 1``
  tokens: per token ``(1 - a)`` times that, and never more than ``t`` of no
  drafts (a frontier step always runs: DSI is never slower than non-SI). The
  generation keeps ``ceil(t / (k d)) + 1`` replicas busy at most: more would
  wait for drafts. Each replica advances the text by about ``k`` per
  verification, so a token costs at least ``t / (n k)``.

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
change into every choice instead cost 1-2% on steady text), unless each draft
verified costs the target time: then 1, since a longer chunk only holds a
replica longer on a pass that the next rejection makes stale.

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

from services.coordinator.costline import Line

#: Lookahead used until the first measurements (and the largest considered by default).
START, LARGEST = 4, 16
#: Most decided drafts the acceptance is measured over, and the chance that it changes at any one.
#: (64 drafts made SI's choice wander with the estimate on steady text: 3-10 at acceptance 0.8, 1.6% slower than
#: the best fixed lookahead; 256: 0.3%.)
MAX_RUN, HAZARD = 256, 1 / 64
#: Acceptances the expected cost is evaluated at (midpoints of equal bins of 0..1).
GRID = (np.arange(40) + 0.5) / 40
_LOG_GRID, _LOG1M_GRID = np.log(GRID), np.log1p(-GRID)
#: Chunks drafting may run ahead beyond one per replica (the engine's ``lead_chunks``).
LEAD_CHUNKS = 2
#: Weight of a new sample in the drafter's seconds-per-token estimate.
SPEED_WEIGHT = 0.2
#: Lookaheads whose expected time per token is within this fraction of the best count as equally good.
#: (1% took the largest of a flat optimum that the event simulator says is not flat: DSI with 2 replicas
#: and acceptance 0.95-0.99 chose 8-11 where 5-6 are 5-7% faster; tools/lookahead_vs_simulator.py.)
NEAR = 0.005
#: After a restart, DSI's first chunk waits about this share of ``t / n`` for a replica (one that ran a
#: cancelled chunk's pass to its end); 0.5 fits the event simulator best (tools/lookahead_vs_simulator.py:
#: 0 and 1 give a mean of 1.0047 and 1.0090 of its best, 0.5 gives 1.0036).
STALE_WAIT = 0.5
#: How far (relative) measurements may move before a planner's :class:`CostTable` is built again.
TABLE_TOLERANCE = 0.01
#: Timings (verifications, draft chunks) that make a planner choose again without a decided draft; a
#: decided draft always does, and the timings since count then. (Every timing did: 2-3 plans a token,
#: ~17% of the busy CPU of a DSI auto coordinator through the services, on the H200 profile.)
REPLAN_TIMINGS = 8


#: An acceptance, or an array of them (the cost functions broadcast).
Acceptance = float | np.ndarray
#: A verification's seconds, or an array of them: one per number of drafts 0, 1, 2, ... (0: a frontier step).
Seconds = float | np.ndarray


def si_seconds_per_token(a: Acceptance, d: float, t: Seconds, k: int | np.ndarray, start: float = 0.0) -> Acceptance:
    """Expected seconds per committed token of SI with lookahead ``k``
    (``a``, ``k``, ``t``, the seconds of a verification of ``k`` drafts:
    numbers or arrays that broadcast; ``a`` below 1); every round starts a
    draft stream, ``start`` seconds before its drafts come at ``d`` each."""
    return (start + k * d + t) * (1 - a) / (1 - a ** (k + 1))


def dsi_seconds_per_token(
    a: Acceptance,
    d: float,
    t: Seconds,
    k: int | np.ndarray,
    n: int,
    floor: bool = True,
    lead: int = LEAD_CHUNKS,
    step: float | None = None,
    start: float = 0.0,
) -> Acceptance:
    """Expected seconds per committed token of DSI with lookahead ``k`` on
    ``n`` replicas (``a`` below 1; ``t``: the seconds of a verification of
    ``k`` drafts, broadcast like ``k``); ``floor``: at most ``step`` (what
    the frontier steps alone give, a verification of no drafts: ``t`` if
    not given; ``start``: a draft stream's seconds before its drafts come at
    ``d`` each, paid after every rejection). Drafting runs at most ``k (n + lead)``
    drafts ahead of the committed text (the engine's limit), and a draft is
    committed about ``k d + t`` after it is drafted, so a small ``k`` holds
    drafting back to ``k (n + lead)`` drafts per ``k d + t``; and a chunk
    leaves as soon as it has ``k`` drafts, so each of the ``n`` replicas
    advances the text by about ``k`` per verification: ``t / (n k)`` per
    token at least."""
    d = max(d, 1e-9)
    # A restart's first chunk: its drafts, and a replica to take it (the others may still run the cancelled
    # chunks' passes to their end; the event simulator's mean wait is about half of a pass over n).
    drafted = start + k * d  # a stream's start and its first k drafts
    first = np.maximum(drafted, STALE_WAIT * t / n)
    paced = np.maximum(d, (drafted + t) / (k * (n + lead)))  # drafting held back by its lead limit
    later = np.maximum(k, t / (max(n - 1, 1) * paced))  # drafts per chunk after the first
    cost = np.maximum((1 - a) * (first + a**k * later * paced / (1 - a**later) + t), t / (n * k))
    return np.minimum(t if step is None else step, cost) if floor else cost


def _pick(costs: np.ndarray, *then: np.ndarray) -> int:
    """The lookahead (1-based index) with the least cost; among those within
    ``NEAR`` of it, the ones within ``NEAR`` of the least of each ``then``
    cost in turn; of what is left, the largest: fewer, longer chunks cost
    fewer RPCs, which the model leaves out."""
    near = costs <= costs.min() * (1 + NEAR)
    for cost in then:
        near &= cost <= cost[near].min() * (1 + NEAR)
    return int(np.flatnonzero(near)[-1]) + 1


def _by_drafts(t: Seconds, largest: int) -> np.ndarray:
    """A verification's seconds with 0..``largest`` drafts."""
    if isinstance(t, np.ndarray) and t.shape == (largest + 1,):
        return t
    return np.broadcast_to(np.asarray(t, dtype=float), (largest + 1,))


@dataclass(frozen=True)
class CostTable:
    """Expected seconds per token of lookahead 1..``largest`` (rows) at the
    acceptances ``a`` (columns), for one set of measurements: what a choice
    weighs against what the acceptance may be. A planner keeps one while its
    measurements stay within ``TABLE_TOLERANCE`` of those it was built from
    (they drift by a few percent per sample at most), so that a choice costs
    a few matrix-vector products, not the whole model again."""

    dsi: bool
    a: np.ndarray
    inputs: np.ndarray  # d, start, n, then a verification's seconds with 0..largest drafts
    costs: np.ndarray  # DSI: at most a frontier step's (the floor)
    unfloored: np.ndarray
    frontier_step: float  # a verification of no drafts

    @classmethod
    def build(
        cls, dsi: bool, a: np.ndarray, d: float, t: Seconds, n: int, largest: int, start: float = 0.0
    ) -> CostTable:
        k = np.arange(1, largest + 1, dtype=float)[:, None]
        tk = _by_drafts(t, largest)
        if dsi:
            raw = np.asarray(dsi_seconds_per_token(a[None, :], d, tk[1:, None], k, n, False, start=start))
            costs = np.minimum(tk[0], raw)
        else:
            raw = costs = np.asarray(si_seconds_per_token(a[None, :], d, tk[1:, None], k, start))
        return cls(dsi, a, cls._inputs(d, t, n, largest, start), costs, raw, float(tk[0]))

    @staticmethod
    def _inputs(d: float, t: Seconds, n: int, largest: int, start: float) -> np.ndarray:
        return np.concatenate(([d, start, n], _by_drafts(t, largest)))

    def serves(self, d: float, t: Seconds, n: int, start: float) -> bool:
        """Whether these measurements are close enough to the table's own."""
        new = self._inputs(d, t, n, len(self.costs), start)
        old = self.inputs
        return new.shape == old.shape and bool((np.abs(new - old) <= 1e-6 + TABLE_TOLERANCE * np.abs(old)).all())

    def choose(self, weights: np.ndarray) -> int:
        """The lookahead with the least cost expected over ``weights`` on
        ``a``. DSI's floor (the frontier steps set the pace) makes lookaheads
        equal when the drafter does not pay (text it cannot guess); among
        those, the one that would be best if the text changed to anything
        (the lookahead stays until drafts show the change), then the one that
        would be best without the floor (a one-draft chunk issued next to the
        frontier step decides the position after it). Where verifying drafts
        costs the target time, though, the shortest: a longer chunk keeps its
        replica longer on a pass that a rejection makes stale while the next
        frontier step may wait for it (the engine on the virtual clock, 2
        replicas, 3 ms more per draft on a 30 ms pass, steady acceptance 0.1:
        1 draft 28.9 ms per token, 3 drafts 30.3, 8 drafts 33.3;
        docs/benchmarks.md, "The shortest chunk where drafts do not pay")."""
        costs = self.costs @ weights
        if not self.dsi:
            return _pick(costs)
        unfloored = self.unfloored @ weights
        if self._at(float(self.a @ weights)).min() >= self.frontier_step / (1 + NEAR):  # no k pays
            if self.drafts_cost_the_target:  # a longer chunk only holds a replica longer for nothing
                return 1
            return _pick(costs, self.costs.mean(axis=1), unfloored)
        return _pick(costs, unfloored)

    @property
    def drafts_cost_the_target(self) -> bool:
        """Whether a verification of the most drafts takes longer than a
        frontier step (a compute-bound target, e.g. on a CPU)."""
        return float(self.inputs[-1]) > self.frontier_step * (1 + NEAR)

    def _at(self, acceptance: float) -> np.ndarray:
        """The (floored) costs at one acceptance, between the table's columns."""
        if len(self.a) == 1:
            return self.costs[:, 0]
        j = float(np.interp(acceptance, self.a, np.arange(len(self.a))))
        lo = min(int(j), len(self.a) - 2)
        return self.costs[:, lo] + (j - lo) * (self.costs[:, lo + 1] - self.costs[:, lo])


def best_lookahead(
    dsi: bool, a: float, d: float, t: Seconds, n: int, largest: int = LARGEST, start: float = 0.0
) -> int:
    """The lookahead in 1..``largest`` with the least expected time per token
    when the acceptance is ``a`` for sure."""
    return CostTable.build(dsi, np.array([min(max(a, 0.0), 0.999)]), d, t, n, largest, start).choose(np.ones(1))


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
    short run at once, so the estimate follows a change within a few drafts.

    Text need not change in stretches: natural text has hard spots a token or
    two long, and a model that expects changes reads each rejection as one
    (one in text of 0.9 moved its estimate to 0.8, and SI's choice from 5 to
    3, while the spot was already over). So the estimate mixes it with one
    acceptance over all the last ``MAX_RUN`` drafts, weighted by how much
    better each has predicted the recent drafts (:attr:`changing`: a log
    odds of their predictions, forgetting at ``1 / MAX_RUN`` per draft)."""

    def __init__(self) -> None:
        self.history: deque[bool] = deque(maxlen=MAX_RUN)  # the last decided drafts, oldest first
        self.runs = np.ones(1)  # probability of run length 0, 1, .. len(history)
        self._accepted = np.zeros(1)  # accepted drafts among the last r, for r = 0, 1, .. len(history)
        self._weights: np.ndarray | None = None  # what weights() gave since the last draft
        #: log odds that the acceptance changes along the text rather than stays: how much better the
        #: change-point model predicted the recent drafts than one acceptance over all of them did
        self.evidence = 0.0

    def copy(self) -> AcceptanceEstimate:
        other = AcceptanceEstimate()
        other.history.extend(self.history)
        other.runs = self.runs.copy()
        other._accepted = self._accepted.copy()
        other.evidence = self.evidence
        return other

    @property
    def changing(self) -> float:
        """How likely the text's acceptance changes along it (0.5: no evidence either way)."""
        return 1.0 / (1.0 + math.exp(-self.evidence))

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Accepted and decided drafts among the last ``r``, for every run length ``r``."""
        return self._accepted, np.arange(len(self._accepted), dtype=float)

    def add(self, accepted: bool) -> None:
        acc, dec = self._counts()
        p = (acc + 1) / (dec + 2)  # each run's predicted probability of an acceptance
        joint = self.runs * (p if accepted else 1 - p)
        predicted = joint.sum()  # what the change-point model predicted for this draft
        steady = p[-1] if accepted else 1 - p[-1]  # ... and one acceptance over every draft
        self.evidence += math.log(predicted / steady) - self.evidence / MAX_RUN
        runs = np.concatenate(([predicted * HAZARD], joint * (1 - HAZARD)))
        if len(runs) > MAX_RUN + 1:  # a run longer than MAX_RUN counts as MAX_RUN long
            runs[-2] += runs[-1]
            runs = runs[:-1]
        self.runs = runs / runs.sum()
        self.history.append(accepted)
        # The last r drafts are this one and the r - 1 before it (the oldest leaves a full history).
        self._accepted = np.concatenate(([0.0], acc[: len(self.history)] + float(accepted)))
        self._weights = None

    def mean(self) -> float:
        acc, dec = self._counts()
        p = (acc + 1) / (dec + 2)
        c = self.changing
        return float(c * (self.runs @ p) + (1 - c) * p[-1])

    def weights(self) -> np.ndarray:
        """How likely each acceptance of :data:`GRID` is now (summing to 1;
        the same array until the next draft: a planner also chooses again
        after timing a verification or a chunk)."""
        if self._weights is None:
            self._weights = self._mixed_posterior()
        return self._weights

    def _mixed_posterior(self) -> np.ndarray:
        acc, dec = self._counts()
        log = acc[:, None] * _LOG_GRID + (dec - acc)[:, None] * _LOG1M_GRID
        pdf = np.exp(log - log.max(axis=1, keepdims=True))
        pdf /= pdf.sum(axis=1, keepdims=True)
        c = self.changing
        return c * (self.runs @ pdf) / self.runs.sum() + (1 - c) * pdf[-1]


def robust_lookahead(
    dsi: bool, weights: np.ndarray, d: float, t: Seconds, n: int, largest: int = LARGEST, start: float = 0.0
) -> int:
    """The lookahead in 1..``largest`` with the least time per token expected
    over acceptances distributed as ``weights`` on :data:`GRID`."""
    return CostTable.build(dsi, GRID, d, t, n, largest, start).choose(weights)


def replicas_needed(d: float, t: float, k: int) -> int:
    """Replicas that keep DSI's chunks of ``k`` drafts from waiting: one
    verification takes ``t``, a chunk is drafted every ``k d``, plus the
    frontier step."""
    return math.ceil(t / max(k * d, 1e-9)) + 1


def _smoothed(mean: float, sample: float) -> float:
    """A running mean of a drafter's seconds per draft (0: no sample yet)."""
    return sample if not mean else mean + SPEED_WEIGHT * (sample - mean)


@dataclass
class LookaheadPlanner:
    """One generation's measurements and its current choice.
    ``measure_target``: the target's seconds per verification (0 = not
    measured yet) and the replicas there are."""

    dsi: bool
    measure_target: Callable[[], tuple[float, int]]
    largest: int = LARGEST
    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    verification: Line = field(default_factory=Line)  # a verification's seconds by the tokens it computes
    stream_start: Line = field(default_factory=Line)  # a draft stream's seconds to its first chunk, by its drafts
    later_drafts: float = 0.0  # seconds per draft in a stream's chunks after its first (0 = none timed)
    computed_drafts: float = 0.0  # seconds per draft the drafter says its first chunks' passes took (0 = none)
    _lookahead: int = START
    _replicas: int = 0  # 0 = every replica the engine allows
    _stale: bool = field(default=True, repr=False)  # a draft decided since the last choice (or the first)
    _timings: int = field(default=0, repr=False)  # timings measured since the last choice
    _table: CostTable | None = field(default=None, repr=False)  # the model at the last choice's measurements
    _weighed: np.ndarray | None = field(default=None, repr=False)  # the acceptance's weights it chose with

    def resume(self, previous: LookaheadPlanner | None) -> None:
        """Start from what an earlier generation with the same drafter and
        targets measured (a copy: each goes on measuring on its own)."""
        if previous is None:
            return
        self.estimate = previous.estimate.copy()
        self.verification = previous.verification.copy()
        self.stream_start = previous.stream_start.copy()
        self.later_drafts = previous.later_drafts
        self.computed_drafts = previous.computed_drafts
        self._stale = True

    @property
    def measured(self) -> bool:
        """Whether it has measured anything worth starting the next generation from."""
        return bool(self.drafting[1] and self.estimate.history)

    @property
    def drafting(self) -> tuple[float, float]:
        """A draft stream's seconds before its drafts come, and per draft
        (0, 0: not timed yet). Per draft: from chunks after a stream's first
        where there are any (DSI's long streams), else what the drafter says
        its first chunks' passes took, else from the first chunks' line (SI's
        streams deliver their drafts in one chunk, and streams of one length
        cannot tell the start from the drafts: through zero, the start counts
        as drafting)."""
        d = self.later_drafts or self.computed_drafts
        if not self.stream_start.measured:
            return 0.0, d
        return self.stream_start.fit(d) if d else self.stream_start.fit(through_zero=True)

    @property
    def acceptance(self) -> float:
        """The measured acceptance (the posterior mean)."""
        return self.estimate.mean()

    def decided(self, accepted: bool) -> None:
        self.estimate.add(accepted)
        self._stale = True

    def verified(self, tokens: int, seconds: float) -> None:
        """A verification that computed ``tokens`` (drafts and what its
        replica had not cached) took ``seconds``, call to answer."""
        if tokens > 0 and seconds > 0:
            self.verification.add(tokens, seconds)
            self._timed()

    def drafted(self, tokens: int, seconds: float, first: bool = False, computing: float = 0.0) -> None:
        """``tokens`` drafted in ``seconds``: a stream's ``first`` chunk,
        since the stream was asked for (its start, the call and a prefill,
        and its drafts), or a later one since the chunk before;
        ``computing``: of those, the drafter's own passes (0: not reported).
        SI on the demo pair chose 1 draft a round, and with streams of one
        length the call's 3-4 ms counted as drafting (6-7 ms per draft
        against 2-3 computed): the choice kept itself."""
        if tokens <= 0 or seconds <= 0:
            return
        if first:
            self.stream_start.add(tokens, seconds)
            if 0 < computing <= seconds:
                self.computed_drafts = _smoothed(self.computed_drafts, computing / tokens)
        else:
            self.later_drafts = _smoothed(self.later_drafts, seconds / tokens)
        self._timed()

    def _timed(self) -> None:
        self._timings += 1
        if self._timings >= REPLAN_TIMINGS:
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
        """Choose again after a decided draft, or after ``REPLAN_TIMINGS``
        timings without one (once the drafter and the target have been
        timed)."""
        if not self._stale:
            return
        start, d = self.drafting
        if not d:
            return
        latency, replicas = self.measure_target()
        if not latency and not self.verification.measured:
            return
        self._stale = False
        self._timings = 0
        # What this generation's verifications took, by size; else the replicas' measured latency.
        t: Seconds = latency
        if self.verification.measured:  # a chunk of k drafts computes k + 1 tokens
            base, per_token = self.verification.fit()
            t = base + per_token * (np.arange(self.largest + 1) + 1.0)
        weights = self.estimate.weights()
        if self._table is None or not self._table.serves(d, t, replicas, start):
            self._table = CostTable.build(self.dsi, GRID, d, t, replicas, self.largest, start)
            self._weighed = None
        if weights is not self._weighed:  # the same table and acceptance would choose the same
            self._lookahead = self._table.choose(weights)
            self._weighed = weights
        if self.dsi:
            tk = float(_by_drafts(t, self.largest)[self._lookahead])
            self._replicas = min(replicas, replicas_needed(d, tk, self._lookahead))
