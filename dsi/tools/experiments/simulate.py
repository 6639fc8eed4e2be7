"""``dsi simulate``: the offline model of non-SI, SI and DSI.

A discrete-event simulation of what :mod:`services.coordinator.engine` does
with synthetic services (:mod:`dsi.backends.synthetic`), so that the latency
measured through the real services divided by the latency simulated here is
the system's own overhead:

* latency model of the synthetic backend: the first forward pass of a session
  on an instance costs ``ttft_ms``, later ones ``tpot_ms``; a target adds
  ``verify_token_ms`` per draft token and ``prefill_token_ms`` per context token
  that replica had not computed for the session (the longest common prefix with
  what it saw last is reused); an optional one-way network delay per link;
* acceptance: greedy decoding with a drafter whose token at each position
  (given the correct prefix) is right with probability ``acceptance``,
  independently per position, exactly as the synthetic drafter's per-context
  coin; a token drafted after a wrong one is junk;
* replica choice as in the coordinator's pool: the fastest idle replica (a
  replica's step time stands for the latency the pool measures), then the one
  caching most of the request, then the one used longest ago;
* non-SI: one target step per token on one replica (the first, listed fastest
  first; the pool keeps a generation on one replica);
* SI: draft ``min(k, left - 1)`` tokens, verify them on that replica, commit the
  accepted drafts and the target's token (the correction or the bonus);
* DSI: the engine's rules, event by event: a frontier step whenever nothing
  covers the frontier (carrying every pending draft), speculative chunks of at
  least ``k`` drafts only on idle replicas while fewer than the SP degree
  verifications exist (drafts that arrive while replicas are busy merge into
  the next chunk), the drafter streaming up to ``k * (SP + 2)`` tokens ahead,
  the first completed verification covering the frontier deciding it, the
  corrected token committed after a rejection, and every verification and the
  draft stream built on a rejected token cancelled at once;
* a device finishes the pass it is in when that pass is cancelled: a stopped
  draft stream's token step, a cancelled verification's forward pass (its
  replica's next request waits for it; the pool chooses replicas it knows to
  run none first). ``abort_passes`` frees a replica at once instead, as the
  DSI paper's simulator does.

Times are in milliseconds. Cancellation and RPCs are free here: that is the
point of comparing with ``dsi bench``. With links of no latency, events tie
exactly where the target's step is a whole number of drafter steps, and DSI
restarts drafting after a rejection without waiting for a drafter step that
any real message would have let begin; ``--target-delay-ms 0.001
--drafter-delay-ms 0.001`` gives the model on the side of its ties that a
real system is on (``TIE_LINK_MS``; ``dsi bench`` reports both).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dsi.domain.types import CHAIN, TreeShape
from dsi.serving.args import tree_shape

STRATEGIES = ("nonsi", "si", "dsi")
DEFAULT_LOOKAHEADS = (1, 2, 3, 5, 8)


@dataclass(frozen=True)
class Node:
    """Latency of one model instance (a target replica or a drafter) and of
    its link to the coordinator."""

    ttft_ms: float
    tpot_ms: float
    verify_token_ms: float = 0.0
    prefill_token_ms: float = 0.0
    delay_ms: float = 0.0  # one-way network delay between the coordinator and this instance

    def forward_ms(self, first: bool) -> float:
        return self.ttft_ms if first else self.tpot_ms


@dataclass(frozen=True)
class SimConfig:
    targets: tuple[Node, ...]
    drafter: Node
    acceptance: float
    lookahead: int
    tokens: int
    prompt_len: int = 8
    max_sp_degree: int = 0  # 0 = every replica (the coordinator's --max-sp-degree)
    lead_chunks: int = 2  # Engine.lead_chunks
    max_draft_tokens: int = 64  # Engine.max_draft_tokens
    #: A cancelled verification frees its replica at once (the DSI paper's simulator). By default its
    #: forward pass runs to its end, as a device's does (and the synthetic target's), cancelled or not.
    abort_passes: bool = False

    @property
    def sp_degree(self) -> int:
        n = len(self.targets)
        return min(n, self.max_sp_degree) if self.max_sp_degree else n

    def check(self) -> None:
        if not self.targets:
            raise ValueError("at least one target replica is needed")
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError("acceptance must lie in [0, 1]")
        if self.lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        if self.tokens < 1:
            raise ValueError("tokens must be >= 1")
        if self.prompt_len < 1:
            raise ValueError("the prompt needs at least one token")
        for node in (*self.targets, self.drafter):
            if min(node.ttft_ms, node.tpot_ms, node.verify_token_ms, node.prefill_token_ms, node.delay_ms) < 0:
                raise ValueError("latencies and delays must be >= 0")

    def with_links(self, ms: float) -> SimConfig:
        """This cluster with every link ``ms`` longer each way (see :data:`TIE_LINK_MS`)."""
        return replace(
            self,
            targets=tuple(replace(t, delay_ms=t.delay_ms + ms) for t in self.targets),
            drafter=replace(self.drafter, delay_ms=self.drafter.delay_ms + ms),
        )


#: Links of 1 µs: the model on the side of its ties that a real system is on. With links of no
#: latency, events coincide exactly where the target's step is a multiple of the drafter's (30 and
#: 3 ms): a verification's result arrives at the very instant the drafter's next step would begin,
#: that step counts as not begun, and a rejection costs the restart no drafter step. Any message
#: takes some time, so in a real system (and in this model with any positive link) that step has
#: begun and runs to its end: up to a drafter step per rejection. DSI at target 30 ms, drafter 3 ms,
#: acceptance 0.8, k = 5, 4 replicas: 9.62 ms/token with no links, 10.07 with links of 0.5 µs to
#: 0.25 ms (and 10.04 with the drafter at 2.99 ms and no links). ``dsi bench`` reports both.
TIE_LINK_MS = 0.001


@dataclass
class Run:
    """One simulated generation."""

    latency_ms: float = 0.0
    target_forwards: int = 0  # verifications started (= target forward passes begun)
    completed_forwards: int = 0
    cancelled: int = 0  # verifications cancelled as stale
    drafted: int = 0  # draft tokens produced by the drafter
    decided_drafts: int = 0
    accepted: int = 0
    draft_streams: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.decided_drafts if self.decided_drafts else 0.0


# --- shared: a replica's session state (first forward, what it has computed) -------------------


class _Replica:
    __slots__ = ("busy", "busy_until", "first", "free_at", "measured", "node", "order", "seen_bad", "seen_len")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.first = True
        self.seen_len = 0
        self.seen_bad: dict[int, int] = {}  # position -> id of a token that is not the target's
        self.busy = False
        self.order = 0
        self.free_at = 0.0  # when its device ends the last pass it was given (DSI)
        #: what the pool believes of a cancelled pass: until then it is chosen last (DSI)
        self.busy_until = 0.0
        self.measured = False  # a verification completed on it: the pool knows its latency (DSI)

    def start(self, ctx_len: int, bad: dict[int, int], n_drafts: int) -> float:
        """Cost of a forward over ``ctx_len`` context tokens plus ``n_drafts``
        drafts (``bad`` lists the positions holding a wrong token)."""
        node = self.node
        ms = node.ttft_ms if self.first else node.tpot_ms
        self.first = False
        ms += node.verify_token_ms * n_drafts
        if node.prefill_token_ms:
            total = ctx_len + n_drafts
            rows = n_drafts + 1
            cached = min(self._lcp(total, bad), total - rows)
            ms += node.prefill_token_ms * (total - cached - rows)
        return ms

    def _lcp(self, total: int, bad: dict[int, int]) -> int:
        limit = min(self.seen_len, total)
        seen = self.seen_bad
        for pos in sorted(set(seen) | set(bad)):
            if pos >= limit:
                break
            if seen.get(pos, 0) != bad.get(pos, 0):
                return pos
        return limit

    def finish(self, total: int, bad: dict[int, int]) -> None:
        self.seen_len = total
        self.seen_bad = bad


def _bad(start: int, ids: Iterable[int]) -> dict[int, int]:
    return {start + i: t for i, t in enumerate(ids) if t}


# --- non-SI and SI ---------------------------------------------------------------------------------


def simulate_nonsi(cfg: SimConfig) -> Run:
    rep = _Replica(cfg.targets[0])
    d = rep.node.delay_ms
    run = Run()
    t = 0.0
    p = cfg.prompt_len
    for i in range(cfg.tokens):
        t += 2 * d + rep.start(p + i, {}, 0)
        rep.finish(p + i, {})
        run.target_forwards += 1
        run.completed_forwards += 1
    run.latency_ms = t
    return run


def simulate_si(cfg: SimConfig, correct: np.ndarray) -> Run:
    """``correct[i]``: the drafter's token at new position ``i`` is the target's."""
    rep = _Replica(cfg.targets[0])
    drafter = cfg.drafter
    d_t, d_d = rep.node.delay_ms, drafter.delay_ms
    drafter_first = True
    run = Run()
    t = 0.0
    c = 0  # committed new tokens
    n, p, k = cfg.tokens, cfg.prompt_len, cfg.lookahead
    wrong_id = itertools.count(1)
    while c < n:
        kk = min(k, n - 1 - c)
        drafts: list[int] = []
        if kk > 0:
            run.draft_streams += 1
            t += 2 * d_d  # the request out, the chunk back
            for i in range(kk):
                t += drafter.ttft_ms if drafter_first else drafter.tpot_ms
                drafter_first = False
                if drafts and drafts[-1]:
                    drafts.append(next(wrong_id))  # drafted after a wrong token: junk
                else:
                    drafts.append(0 if correct[c + i] else next(wrong_id))
            run.drafted += kk
        bad = _bad(p + c, drafts)
        t += 2 * d_t + rep.start(p + c, bad, kk)
        rep.finish(p + c + kk, bad)
        run.target_forwards += 1
        run.completed_forwards += 1
        accepted = 0
        while accepted < kk and drafts[accepted] == 0:
            accepted += 1
        run.decided_drafts += min(kk, accepted + 1)
        run.accepted += accepted
        c += accepted + 1
    run.latency_ms = t
    return run


# --- DSI: the engine's event loop ---------------------------------------------------------------


class _Verif:
    __slots__ = (
        "bad",
        "base",
        "done",
        "done_order",
        "drafts",
        "end",
        "issued",
        "pass_start",
        "prev_free",
        "rep",
        "seq",
        "t_done",
        "total",
    )

    def __init__(self, seq: int, base: int, drafts: list[int], rep: _Replica) -> None:
        self.seq = seq
        self.base = base
        self.drafts = drafts
        self.end = base + len(drafts)  # the bonus position
        self.rep = rep
        self.done = False
        self.done_order = -1
        self.t_done = 0.0
        self.issued = self.pass_start = self.prev_free = 0.0
        self.total = 0
        self.bad: dict[int, int] | None = None


class _Stream:
    __slots__ = ("budget", "live", "next_pos", "poisoned", "produced", "server_t", "steps")

    def __init__(self, start: int, budget: int, poisoned: bool, server_t: float) -> None:
        self.next_pos = start
        self.budget = budget
        self.poisoned = poisoned
        self.produced = 0
        self.server_t = server_t  # when the drafter finished its previous token
        self.steps: list[tuple[float, float]] = []  # (start, end) of each token step of the chunk being drafted
        self.live = True


_VERIFY, _CHUNK = 0, 1
#: Times closer than this are the same instant (sums of step times round differently).
_EPS_MS = 1e-6


class _DSI:
    def __init__(self, cfg: SimConfig, correct: np.ndarray) -> None:
        self.cfg = cfg
        self.correct = correct
        self.k = cfg.lookahead
        self.last = cfg.tokens - 1
        self.sp = cfg.sp_degree
        self.max_lead = self.k * (self.sp + cfg.lead_chunks)
        self.reps = [_Replica(n) for n in cfg.targets]
        self.tie = itertools.count(1)
        self.drafter_first = True
        self.c = 0
        self.pending: list[int] = []  # token ids of the drafts for new positions c, c+1, ...
        self.verifs: list[_Verif] = []
        self.seq = itertools.count()
        self.done_count = itertools.count()
        self.wrong_id = itertools.count(1)
        self.stream: _Stream | None = None
        #: when the drafter's device is free: a stopped stream's token step in progress runs to its end
        self.drafter_free = 0.0
        self.events: list[tuple[float, int, int, object]] = []
        self.ev_seq = itertools.count()
        self.t = 0.0
        self.finished = False
        self.run = Run()

    # pool ---------------------------------------------------------------------------------------

    def _take(self, rep: _Replica) -> _Replica:
        rep.busy = True
        rep.order = next(self.tie)
        return rep

    def _choose(self, reps: list[_Replica], base: int) -> _Replica:
        """The pool's choice (services/coordinator/pool.py): one that runs no
        cancelled pass as far as the pool knows (if any), then the fastest
        (within 20%; here a replica's step time stands for its measured
        latency), then the one caching most of the first ``base`` positions,
        then the one used longest ago."""
        reps = [r for r in reps if r.busy_until <= self.t + _EPS_MS] or reps
        speed = [r.node.tpot_ms + 2 * r.node.delay_ms for r in reps]
        fastest = min(speed)
        fast = [r for r, sp in zip(reps, speed, strict=True) if sp <= fastest * 1.2]
        return min(fast, key=lambda r: (-min(r.seen_len, self.cfg.prompt_len + base), r.order))

    def _idle(self, base: int) -> _Replica | None:
        idle = [r for r in self.reps if not r.busy]
        return self._take(self._choose(idle, base)) if idle else None

    # verifications ------------------------------------------------------------------------------

    def _issue(self, base: int, drafts: list[int], rep: _Replica) -> None:
        v = _Verif(next(self.seq), base, drafts, rep)
        node = rep.node
        if node.prefill_token_ms:  # the exact cache model: what this replica computed before
            c, p = self.c, self.cfg.prompt_len
            # the context: committed tokens (all the target's own), then pending drafts up to base
            bad = _bad(p + c, self.pending[: base - c]) if base > c else {}
            bad.update(_bad(p + base, drafts))
            v.total = p + base + len(drafts)
            v.bad = bad
            ms = rep.start(p + base, bad, len(drafts))
        else:  # no prefill cost: only the first forward of the session differs
            ms = node.ttft_ms if rep.first else node.tpot_ms
            rep.first = False
            ms += node.verify_token_ms * len(drafts)
        v.issued = self.t
        v.prev_free = rep.free_at
        v.pass_start = self.t + node.delay_ms
        if not self.cfg.abort_passes:  # the device is done with the passes it was given before
            v.pass_start = max(v.pass_start, rep.free_at)
        rep.free_at = v.pass_start + ms
        v.t_done = rep.free_at + node.delay_ms
        self.verifs.append(v)
        self.run.target_forwards += 1
        heapq.heappush(self.events, (v.t_done, next(self.ev_seq), _VERIFY, v))

    def _cancel(self, v: _Verif) -> None:
        if not v.done:
            v.done = True  # never completes
            v.done_order = -2
            self.run.cancelled += 1
            rep = v.rep
            rep.busy = False
            if self.cfg.abort_passes or v.pass_start >= self.t + rep.node.delay_ms - _EPS_MS:
                rep.free_at = v.prev_free  # aborted, or the cancel arrives before its pass starts: it never runs
            elif rep.measured:  # its pass runs on: the pool expects it to take the replica's latency from its call
                rep.busy_until = max(rep.busy_until, v.issued + rep.node.tpot_ms + 2 * rep.node.delay_ms)

    # the engine's steps -------------------------------------------------------------------------

    def _more_drafts_coming(self) -> bool:
        return self.c + len(self.pending) <= self.last

    def _dispatch(self) -> None:
        c = self.c
        if self.finished or c > self.last:
            return
        if not self.verifs:
            n = min(len(self.pending), self.cfg.max_draft_tokens, self.last + 1 - c)
            rep = self._idle(c)
            if rep is None:  # cannot happen with one generation: every lease is released
                rep = self._take(self._choose(self.reps, c))
            self._issue(c, self.pending[:n], rep)
        while len(self.verifs) < self.sp:
            start = self.verifs[-1].end  # issued in order, each starting where the last ends
            avail = self.pending[start - c : self.last + 1 - c]
            if not avail or (len(avail) < self.k and self._more_drafts_coming()):
                return
            rep = self._idle(start)
            if rep is None:
                return
            self._issue(start, avail[: self.cfg.max_draft_tokens], rep)

    def _ensure_stream(self) -> None:
        if self.stream is not None or self.finished or not self._more_drafts_coming():
            return
        room = self.max_lead - len(self.pending)
        if room < self.k:
            return
        end = self.c + len(self.pending)
        budget = min(room, self.last + 1 - end)
        poisoned = any(self.pending)
        d = self.cfg.drafter.delay_ms
        self.stream = s = _Stream(end, budget, poisoned, max(self.t + d, self.drafter_free))
        self.run.draft_streams += 1
        self._schedule_chunk(s)

    def _schedule_chunk(self, s: _Stream) -> None:
        drafter = self.cfg.drafter
        n = min(self.k, s.budget - s.produced)
        t = s.server_t
        s.steps = []
        for _ in range(n):
            start, t = t, t + (drafter.ttft_ms if self.drafter_first else drafter.tpot_ms)
            self.drafter_first = False
            s.steps.append((start, t))
        s.server_t = t
        heapq.heappush(self.events, (t + drafter.delay_ms, next(self.ev_seq), _CHUNK, (s, n)))

    def _on_chunk(self, s: _Stream, n: int) -> None:
        self.run.drafted += n
        tokens = []
        pos = s.next_pos
        for i in range(n):
            if s.poisoned:
                tokens.append(next(self.wrong_id))
            elif self.correct[pos + i]:
                tokens.append(0)
            else:
                tokens.append(next(self.wrong_id))
                s.poisoned = True
        s.next_pos += n
        s.produced += n
        c = self.c
        for tok in tokens:
            end = c + len(self.pending)
            if pos < end:  # the frontier overtook the drafter: compare with what is known
                known = 0 if pos < c else self.pending[pos - c]
                if known != tok:
                    self._stop_stream()
                    return
            elif pos == end and pos <= self.last:
                self.pending.append(tok)
            pos += 1
        if s.produced >= s.budget:
            self.stream = None  # the stream ends (StopAsyncIteration right after its last chunk)
        else:
            self._schedule_chunk(s)

    def _stop_stream(self) -> None:
        if self.stream is not None:
            # The cancel reaches the drafter a link delay later; the token step it is in then (a forward
            # pass: a device does not abort one half way) ends before the next stream's first step begins.
            # A step that begins at that very instant has not started (the engine drops it unrun).
            arrives = self.t + self.cfg.drafter.delay_ms
            running = (e for b, e in self.stream.steps if b < arrives - _EPS_MS and e > arrives + _EPS_MS)
            self.drafter_free = next(running, self.drafter_free)
            self.stream.live = False
            self.stream = None

    def _commit(self) -> bool:
        """Commit the target's token at the frontier; True if it differs from the pending draft."""
        diverged = False
        if self.pending:
            draft = self.pending.pop(0)
            self.run.decided_drafts += 1
            if draft == 0:
                self.run.accepted += 1
            else:
                diverged = True
        self.c += 1
        if self.c > self.last:
            self.finished = True
            self.run.latency_ms = self.t
        if diverged:
            self._diverge()
        return diverged

    def _diverge(self) -> None:
        self.pending.clear()
        for v in self.verifs:
            self._cancel(v)
        self.verifs.clear()
        self._stop_stream()

    def _resolve(self) -> None:
        while not self.finished:
            c = self.c
            best: _Verif | None = None
            for v in self.verifs:
                if v.done_order >= 0 and v.base <= c <= v.end and (best is None or v.done_order < best.done_order):
                    best = v
            if best is None:
                break
            v = best
            self.verifs.remove(v)
            broken = False
            pos = c
            all_ok = not any(v.drafts)
            while pos < v.end and not self.finished:
                ok = v.drafts[pos - v.base] == 0
                broken = self._commit()
                if broken or not ok:
                    break
                pos += 1
            if pos == v.end and not broken and not self.finished and all_ok:
                self._commit()
            c = self.c
            for w in [w for w in self.verifs if w.end < c]:
                self.verifs.remove(w)
                self._cancel(w)

    def simulate(self) -> Run:
        events = self.events
        pop = heapq.heappop
        while not self.finished:
            self._dispatch()
            self._ensure_stream()
            if not events:
                raise RuntimeError("DSI simulation has nothing in flight (bug)")
            t, _, kind, obj = pop(events)
            self.t = t
            verified: list[_Verif] = []
            chunk = None
            while True:
                if kind == _VERIFY:
                    if not obj.done:  # type: ignore[union-attr]
                        verified.append(obj)  # type: ignore[arg-type]
                elif obj[0].live:  # type: ignore[index]
                    chunk = obj
                if not events or events[0][0] > t:
                    break
                _, _, kind, obj = pop(events)
            if len(verified) > 1:
                verified.sort(key=lambda v: v.seq)
            for v in verified:
                v.done = True
                v.done_order = next(self.done_count)
                v.rep.busy = False
                v.rep.measured = True
                if v.bad is not None:
                    v.rep.finish(v.total, v.bad)
                self.run.completed_forwards += 1
            if chunk is not None:
                self._on_chunk(*chunk)  # type: ignore[misc]
            self._resolve()
        return self.run


def simulate_dsi(cfg: SimConfig, correct: np.ndarray) -> Run:
    return _DSI(cfg, correct).simulate()


# --- repeats, summaries ---------------------------------------------------------------------------


def draw_coins(acceptance: float, tokens: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random(tokens) < acceptance


def simulate_one(cfg: SimConfig, correct: np.ndarray, strategies: Sequence[str] = STRATEGIES) -> dict[str, Run]:
    out: dict[str, Run] = {}
    for s in strategies:
        if s == "nonsi":
            out[s] = simulate_nonsi(cfg)
        elif s == "si":
            out[s] = simulate_si(cfg, correct)
        elif s == "dsi":
            out[s] = simulate_dsi(cfg, correct)
        else:
            raise ValueError(f"unknown strategy {s!r}")
    return out


@dataclass
class Summary:
    strategy: str
    lookahead: int
    runs: list[Run] = field(default_factory=list)

    @property
    def latencies(self) -> np.ndarray:
        return np.array([r.latency_ms for r in self.runs])

    @property
    def mean_ms(self) -> float:
        return float(self.latencies.mean())

    def row(self, tokens: int) -> dict[str, float | int | str]:
        lat = self.latencies
        n = len(self.runs)
        return {
            "strategy": self.strategy,
            "lookahead": self.lookahead,
            "repeats": n,
            "latency_ms_mean": float(lat.mean()),
            "latency_ms_std": float(lat.std(ddof=1)) if n > 1 else 0.0,
            "ms_per_token_mean": float(lat.mean() / tokens),
            "ms_per_token_median": float(np.median(lat) / tokens),
            "acceptance_rate": float(np.mean([r.acceptance_rate for r in self.runs])),
            "target_forwards": float(np.mean([r.target_forwards for r in self.runs])),
            "cancelled_verifications": float(np.mean([r.cancelled for r in self.runs])),
            "drafted_tokens": float(np.mean([r.drafted for r in self.runs])),
            "draft_streams": float(np.mean([r.draft_streams for r in self.runs])),
            "tokens_per_target_pass": float(tokens / np.mean([max(r.completed_forwards, 1) for r in self.runs])),
        }


def simulate_config(
    cfg: SimConfig,
    repeats: int,
    seed: int,
    lookaheads: Sequence[int] | None = None,
    strategies: Sequence[str] = STRATEGIES,
    select_on_first: bool = False,
) -> dict[str, Summary]:
    """Mean latency per strategy over ``repeats`` draws of the accept/reject
    process (the same draws for every strategy and lookahead). With several
    ``lookaheads``, SI and DSI each keep their fastest one; ``select_on_first``
    picks it on the first draw only and runs the other draws with it alone
    (the grid's shortcut)."""
    cfg.check()
    ks = list(lookaheads or [cfg.lookahead])
    rng = np.random.default_rng(seed)
    coins = [draw_coins(cfg.acceptance, cfg.tokens, rng) for _ in range(repeats)]
    best: dict[str, Summary] = {}
    if "nonsi" in strategies:
        run = simulate_nonsi(cfg)  # deterministic
        best["nonsi"] = Summary("nonsi", 0, [run] * repeats)
    for s in (s for s in strategies if s != "nonsi"):
        if select_on_first and len(ks) > 1:
            first = {k: simulate_one(replace(cfg, lookahead=k), coins[0], [s])[s] for k in ks}
            k = min(ks, key=lambda k: first[k].latency_ms)
            kc = replace(cfg, lookahead=k)
            best[s] = Summary(s, k, [first[k]] + [simulate_one(kc, coin, [s])[s] for coin in coins[1:]])
            continue
        for k in ks:
            kc = replace(cfg, lookahead=k)
            summ = Summary(s, k, [simulate_one(kc, coin, [s])[s] for coin in coins])
            if s not in best or summ.mean_ms < best[s].mean_ms:
                best[s] = summ
    return best


def simulate_config_engine(
    cfg: SimConfig,
    repeats: int,
    seed: int,
    lookaheads: Sequence[int],
    tree: TreeShape,
    sibling_acceptance: float,
    strategies: Sequence[str] = STRATEGIES,
) -> dict[str, Summary]:
    """:func:`simulate_config` with the engine itself as the model
    (:mod:`dsi.tools.experiments.engine_sim`): token trees included."""
    from dsi.tools.experiments.engine_sim import simulate_engine

    cfg.check()
    best: dict[str, Summary] = {}
    for k in lookaheads:
        kc = replace(cfg, lookahead=k)
        runs = simulate_engine(kc, strategies, repeats, seed, tree, sibling_acceptance)
        for s, rs in runs.items():
            summ = Summary(s, 0 if s == "nonsi" else k, rs)
            if s not in best or summ.mean_ms < best[s].mean_ms:
                best[s] = summ
    return best


# --- closed forms (tests and sanity) ---------------------------------------------------------------


def nonsi_closed_form(cfg: SimConfig) -> float:
    n = cfg.targets[0]
    first = n.ttft_ms + n.prefill_token_ms * (cfg.prompt_len - 1)
    return cfg.tokens * (n.tpot_ms + 2 * n.delay_ms) + first - n.tpot_ms


def expected_tokens_per_si_round(a: float, k: int) -> float:
    """Tokens committed per SI round of ``k`` drafts (accepted + 1)."""
    return float(k + 1) if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


# --- grid mode ------------------------------------------------------------------------------------


def _grid_cell(args: tuple[SimConfig, int, int, tuple[int, ...]]) -> dict[str, float]:
    cfg, repeats, seed, ks = args
    best = simulate_config(cfg, repeats, seed, ks, select_on_first=True)
    nonsi, si, dsi = (best[s].mean_ms for s in STRATEGIES)
    return {
        "nonsi_ms": nonsi,
        "si_ms": si,
        "dsi_ms": dsi,
        "si_lookahead": best["si"].lookahead,
        "dsi_lookahead": best["dsi"].lookahead,
        "dsi_over_si": dsi / si,
        "dsi_over_nonsi": dsi / nonsi,
        "si_over_nonsi": si / nonsi,
        "dsi_over_best": dsi / min(si, nonsi),
    }


RATIOS = {
    "dsi_over_si": "DSI / SI",
    "dsi_over_nonsi": "DSI / non-SI",
    "si_over_nonsi": "SI / non-SI",
    "dsi_over_best": "DSI / min(SI, non-SI)",
}


def grid_axes(n_fracs: int, n_accs: int, frac_range=(0.01, 1.0), acc_range=(0.01, 0.99)) -> tuple[np.ndarray, ...]:
    return np.linspace(*frac_range, n_fracs), np.linspace(*acc_range, n_accs)


def run_grid(
    base: SimConfig,
    fracs: Sequence[float],
    accs: Sequence[float],
    repeats: int,
    seed: int,
    lookaheads: Sequence[int],
    workers: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Every (drafter latency fraction, acceptance) cell: drafter TTFT and TPOT
    are ``frac`` times the target's TPOT; ``base`` gives the rest."""
    t_tpot = base.targets[0].tpot_ms
    jobs = []
    cells = []
    for i, a in enumerate(accs):
        for j, f in enumerate(fracs):
            d = replace(base.drafter, ttft_ms=f * t_tpot, tpot_ms=f * t_tpot)
            cfg = replace(base, drafter=d, acceptance=float(a))
            jobs.append((cfg, repeats, seed + 7919 * i + j, tuple(lookaheads)))
            cells.append({"drafter_fraction": float(f), "acceptance": float(a)})
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    bar = _progress(len(jobs), "simulate grid", progress)
    results = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(_grid_cell, jobs, chunksize=max(1, len(jobs) // (workers * 16))):
                results.append(r)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_grid_cell(job))
            bar.update(1)
    bar.close()
    return [{**cell, **r} for cell, r in zip(cells, results, strict=True)]


class _NoBar:
    total = 0

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True)


# --- files ----------------------------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in keys})


def _fmt(v: object) -> object:
    return f"{v:.6g}" if isinstance(v, float) else v


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- CLI ------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("lookaheads must be integers >= 1")
    return out


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target and drafter latency (ms)")
    g.add_argument(
        "--target-tpot", type=float, default=30.0, help="target time per output token (default: %(default)s)"
    )
    g.add_argument("--target-ttft", type=float, help="target time to first token (default: = --target-tpot)")
    g.add_argument("--verify-token-ms", type=float, default=0.0, help="target cost per draft token verified")
    g.add_argument("--prefill-token-ms", type=float, default=0.0, help="target cost per context token not cached")
    g.add_argument("--drafter-tpot", type=float, default=3.0, help="drafter time per token (default: %(default)s)")
    g.add_argument("--drafter-ttft", type=float, help="drafter first forward (default: = --drafter-tpot)")
    g.add_argument("--target-delay-ms", type=float, default=0.0, help="one-way network delay to each target")
    g.add_argument("--drafter-delay-ms", type=float, default=0.0, help="one-way network delay to the drafter")
    g = p.add_argument_group("algorithm")
    g.add_argument("--acceptance", type=float, default=0.7, help="per-token acceptance rate (default: %(default)s)")
    g.add_argument(
        "--lookahead",
        type=_ints,
        default=(5,),
        metavar="K[,K...]",
        help="draft tokens per chunk; several = SI and DSI each take their best (default: 5)",
    )
    g.add_argument("--sp", type=int, default=7, help="target replicas = SP degree (default: %(default)s)")
    g.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    g.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default: %(default)s)")
    g.add_argument("--repeats", type=int, default=5, help="draws of the accept/reject process (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--tree",
        type=tree_shape,
        default=CHAIN,
        metavar="WxD",
        help="token trees of this shape for SI and DSI (e.g. 3x2); simulated by the engine itself on a virtual"
        " clock (default: chains)",
    )
    g.add_argument(
        "--sibling-acceptance",
        type=float,
        default=0.4,
        help="with --tree: probability that the drafter's next guess is right when the previous ones are wrong"
        " (the synthetic drafter's key; default: %(default)s)",
    )
    g.add_argument(
        "--abort-passes",
        action="store_true",
        help="DSI: a cancelled verification frees its replica at once (the DSI paper's simulator); by default its"
        " forward pass runs to its end, as on a device (the event model; the engine's passes always run to their end)",
    )
    g.add_argument(
        "--engine",
        action="store_true",
        help="simulate with the engine itself on a virtual clock (slower; implied by --tree)",
    )
    g = p.add_argument_group("grid mode (the paper's Figure 1)")
    g.add_argument("--grid", action="store_true", help="sweep drafter latency x acceptance and draw heatmaps")
    g.add_argument(
        "--grid-size",
        type=_ints,
        default=(50, 50),
        metavar="NF,NA",
        help="cells along drafter latency fraction and acceptance (default: 50,50; 100,100 takes ~4x longer)",
    )
    g.add_argument("--fraction-range", type=_range, default=(0.01, 1.0), metavar="LO,HI")
    g.add_argument("--acceptance-range", type=_range, default=(0.01, 0.99), metavar="LO,HI")
    g.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    p.add_argument("--out", default="results/simulate", help="output folder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    target = Node(
        args.target_ttft if args.target_ttft is not None else args.target_tpot,
        args.target_tpot,
        args.verify_token_ms,
        args.prefill_token_ms,
        args.target_delay_ms,
    )
    drafter = Node(
        args.drafter_ttft if args.drafter_ttft is not None else args.drafter_tpot,
        args.drafter_tpot,
        delay_ms=args.drafter_delay_ms,
    )
    if args.sp < 1:
        raise SystemExit("--sp must be >= 1")
    return SimConfig(
        (target,) * args.sp,
        drafter,
        args.acceptance,
        args.lookahead[0],
        args.tokens,
        args.prompt_len,
        abort_passes=args.abort_passes,
    )


def summary_rows(best: dict[str, Summary], tokens: int) -> list[dict]:
    rows = [best[s].row(tokens) for s in STRATEGIES if s in best]
    by = {r["strategy"]: r["latency_ms_mean"] for r in rows}
    for r in rows:
        r["speedup_over_nonsi"] = by["nonsi"] / r["latency_ms_mean"] if "nonsi" in by else math.nan
    return rows


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        cfg.check()
    except ValueError as exc:
        raise SystemExit(f"dsi simulate: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    by_engine = args.engine or not args.tree.is_chain
    if args.grid and by_engine:
        raise SystemExit("dsi simulate: --grid simulates chains with the fast model; drop --tree/--engine")
    if not args.grid:
        if by_engine:
            best = simulate_config_engine(
                cfg, args.repeats, args.seed, args.lookahead, args.tree, args.sibling_acceptance
            )
        else:
            best = simulate_config(cfg, args.repeats, args.seed, args.lookahead)
        rows = summary_rows(best, cfg.tokens)
        write_csv(out / "simulate.csv", rows)
        result = {
            "config": asdict(cfg),
            "repeats": args.repeats,
            "seed": args.seed,
            "model": "engine on a virtual clock" if by_engine else "discrete-event model",
            "tree": str(args.tree),
            "strategies": rows,
        }
        (out / "simulate.json").write_text(json.dumps(result, indent=2))
        if args.json:
            print(json.dumps(result))
        else:
            print(format_table(rows))
            dsi, si = best["dsi"].mean_ms, best["si"].mean_ms
            print(
                f"\nDSI/SI = {dsi / si:.3f}, DSI/non-SI = {dsi / best['nonsi'].mean_ms:.3f}"
                f"  ({args.repeats} repeats, {time.perf_counter() - started:.1f}s; written to {out})"
            )
        return 0
    nf, na = (args.grid_size * 2)[:2]
    fracs, accs = grid_axes(nf, na, args.fraction_range, args.acceptance_range)
    rows = run_grid(cfg, fracs, accs, args.repeats, args.seed, args.lookahead, args.workers, not args.no_progress)
    write_csv(out / "grid.csv", rows)
    meta = {
        "config": asdict(cfg),
        "grid": [nf, na],
        "fraction_range": list(args.fraction_range),
        "acceptance_range": list(args.acceptance_range),
        "lookaheads": list(args.lookahead),
        "repeats": args.repeats,
        "seed": args.seed,
        "seconds": time.perf_counter() - started,
    }
    (out / "grid.json").write_text(json.dumps(meta, indent=2))
    pngs = []
    try:
        from dsi.tools.experiments import plots

        pngs = plots.grid_heatmaps(rows, out, "simulated", meta)
    except ImportError as exc:
        print(f"dsi simulate: no plots ({exc}); install matplotlib: pip install 'dsi[experiments]'", file=sys.stderr)
    print(grid_summary(rows))
    print(f"\n{len(rows)} cells in {meta['seconds']:.1f}s; written to {out}: grid.csv, grid.json, " + ", ".join(pngs))
    return 0


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'strategy':>8} {'k':>3} {'ms/token':>9} {'latency ms':>11} {'±std':>8} {'speedup':>8} {'accept':>7}"
    lines = [head + f" {'tok/pass':>8}"]
    for r in rows:
        lines.append(
            f"{r['strategy']:>8} {r['lookahead']:>3} {r['ms_per_token_mean']:>9.3f} {r['latency_ms_mean']:>11.1f}"
            f" {r['latency_ms_std']:>8.1f} {r['speedup_over_nonsi']:>7.2f}x {r['acceptance_rate']:>7.2f}"
            f" {r['tokens_per_target_pass']:>8.2f}"
        )
    return "\n".join(lines)


def grid_summary(rows: Sequence[dict]) -> str:
    def frac(key: str, below: bool = True) -> float:
        vals = np.array([float(r[key]) for r in rows])
        return float(np.mean(vals < 1.0 if below else vals > 1.0))

    lines = []
    for key, label in RATIOS.items():
        vals = np.array([float(r[key]) for r in rows])
        lines.append(
            f"{label:>22}: min {vals.min():.3f}  median {np.median(vals):.3f}  max {vals.max():.3f}"
            f"  (cells < 1: {100 * frac(key):.1f}%)"
        )
    si_slow = [r for r in rows if float(r["si_over_nonsi"]) > 1.0]
    if si_slow:
        worst = max(float(r["dsi_over_nonsi"]) for r in si_slow)
        lines.append(
            f"where SI is slower than non-SI ({100 * len(si_slow) / len(rows):.1f}% of cells), "
            f"DSI/non-SI is at most {worst:.3f}"
        )
    return "\n".join(lines)
