"""The synthetic backend: a deterministic pseudo language model with
configurable latency, and a drafter that agrees with it at a chosen rate.

Spec grammar (every key optional)::

    synthetic:vocab=32000,seed=0,ttft_ms=0,tpot_ms=0,acceptance=0.8,
              verify_token_ms=0,prefill_token_ms=0,max_context=8192,
              support=8,eos=-1,jitter_ms=0,sibling_acceptance=0.4,coin_seed=-1,
              hard_acceptance=-1,block=64,batch_slope=1

The target's next-token distribution ``p`` after a context depends only on
``(seed, len(context), context[-4:])``: ``support`` tokens with random weights.
The drafter, built from the same vocab and seed, knows ``p``: when a
per-context coin with bias ``A`` says so it proposes the very token the target
will choose there (the decision rule of :mod:`dsi.domain.sampling`, with the
request's sampling parameters and seed), otherwise a token outside ``p``'s
support, which the target never chooses. Each draft is therefore accepted with
probability exactly ``A``, independently, for greedy decoding and for sampling.
Asked for several guesses (a token tree), the drafter ranks the target's token
second with probability ``sibling_acceptance`` when its first guess is wrong,
third with that probability when the first two are wrong, and so on; the other
guesses are tokens the target never chooses. The coins are keyed by
``coin_seed`` (default: ``seed``): drafters of one pair with different coin
seeds are right at different positions, independently. With
``hard_acceptance`` >= 0 the text alternates between easy and hard blocks of
``block`` positions: ``acceptance`` in even blocks (positions 0 .. block - 1,
2 block .., ...), ``hard_acceptance`` in odd ones (a drafter whose acceptance
changes along the sequence, for the automatic lookahead).

Latency is an ``asyncio.sleep`` (corrected for the event loop's timer, which
returns late: :class:`TimerLateness`; in a model's own process a wait exact to
about 0.05 ms, :class:`PassTimer`): the first forward pass of a session sleeps
``ttft_ms``, later ones ``tpot_ms``; a target adds ``verify_token_ms`` per draft
token and ``prefill_token_ms`` per context token it had not seen in that
session (apart from the last one, which every forward pass computes).
``jitter_ms`` adds a uniform random delay (for tests of races). A tree
verification costs ``verify_token_ms`` per node, like a chain.

**Batching** (:mod:`dsi.backends.batching`). A pass over ``B`` requests of
different sessions sleeps ``base * (1 + batch_slope * (B - 1))`` plus the sum
of the requests' per-token costs, where ``base`` is the largest of their
``ttft_ms`` / ``tpot_ms`` (a session's first pass pays TTFT). A GPU decoding a
small model is memory-bound, so another sequence in the pass costs little:
``batch_slope`` about 0.02-0.05. The default, 1, makes a batch cost what its
requests cost one after the other (no gain), so a target configured without
it behaves as before. The drafter's steps batch the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import random
import struct
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from dsi.backends.base import DrafterModel, DraftItem, Forward, TargetModel
from dsi.backends.batching import BatchItem
from dsi.domain import sampling
from dsi.domain.errors import InvalidArgument
from dsi.domain.prefix import common_prefix
from dsi.domain.types import ROOT, Decision, ModelInfo, SamplingParams, VerifyRequest

PREFIX = "synthetic"
CONTEXT_WINDOW = 4  # tokens of context the pseudo model looks at


@dataclass(frozen=True)
class SyntheticSpec:
    vocab: int = 32000
    seed: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    acceptance: float = 0.8
    verify_token_ms: float = 0.0
    prefill_token_ms: float = 0.0
    max_context: int = 8192
    support: int = 8
    eos: int = -1
    jitter_ms: float = 0.0
    sibling_acceptance: float = 0.4
    coin_seed: int = -1  # -1 = seed
    batch_slope: float = 1.0  # a pass over B requests costs base * (1 + batch_slope * (B - 1))
    hard_acceptance: float = -1.0  # >= 0: the acceptance in odd blocks of ``block`` positions
    block: int = 64

    def acceptance_at(self, position: int) -> float:
        """The drafter's acceptance at sequence ``position``."""
        if self.hard_acceptance >= 0 and (position // self.block) % 2 == 1:
            return self.hard_acceptance
        return self.acceptance

    @classmethod
    def parse(cls, spec: str) -> SyntheticSpec:
        head, _, body = spec.partition(":")
        if head != PREFIX:
            raise InvalidArgument(f"not a synthetic model spec: {spec!r}")
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int] = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in types:
                raise InvalidArgument(f"bad synthetic spec item {item!r}; known keys: {', '.join(types)}")
            try:
                values[key] = int(raw) if types[key] == "int" else float(raw)
            except ValueError:
                kind = "an integer" if types[key] == "int" else "a number"
                raise InvalidArgument(f"synthetic spec: {key} must be {kind}, got {raw!r}") from None
        out = cls(**values)  # type: ignore[arg-type]
        out.check()
        return out

    def check(self) -> None:
        if self.vocab < 2 * self.support or self.support < 1:
            raise InvalidArgument("synthetic spec: need support >= 1 and vocab >= 2 * support")
        if not 0.0 <= self.acceptance <= 1.0 or not 0.0 <= self.sibling_acceptance <= 1.0:
            raise InvalidArgument("synthetic spec: acceptance and sibling_acceptance must lie in [0, 1]")
        if self.hard_acceptance > 1.0 or self.block < 1:
            raise InvalidArgument("synthetic spec: hard_acceptance must be at most 1 and block at least 1")
        latencies = (
            self.ttft_ms,
            self.tpot_ms,
            self.verify_token_ms,
            self.prefill_token_ms,
            self.jitter_ms,
            self.batch_slope,
        )
        if not all(math.isfinite(v) and v >= 0 for v in latencies):
            raise InvalidArgument("synthetic spec: latencies must be finite numbers >= 0 (batch_slope too)")
        if self.max_context < 2:
            raise InvalidArgument("synthetic spec: max_context must be >= 2")
        if self.eos >= self.vocab:
            raise InvalidArgument("synthetic spec: eos must be < vocab")

    def model_info(self, spec: str) -> ModelInfo:
        fp = hashlib.sha256(f"synthetic-vocab:{self.vocab}".encode()).hexdigest()[:32]
        return ModelInfo(
            model_id=spec,
            backend="synthetic",
            vocab_size=self.vocab,
            eos_token_ids=(self.eos,) if self.eos >= 0 else (),
            max_context_tokens=self.max_context,
            tokenizer_fingerprint=fp,
            device="virtual",
            dtype="float64",
        )


class PseudoLM:
    """The deterministic pseudo language model shared by a synthetic pair."""

    def __init__(self, vocab: int, seed: int, support: int) -> None:
        self.vocab, self.seed, self.support = vocab, seed, support

    def draw(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """(p ids, p probs, r ids, r probs, coin) for the position after ``tokens``."""
        return self._draw(len(tokens), tuple(tokens[-CONTEXT_WINDOW:]))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one model per process; positions recur across replicas
    def _draw(self, length: int, tail: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        key = struct.pack(f"<QQ{len(tail)}Q", self.seed & (2**64 - 1), length, *tail)
        rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little"))
        ids = rng.choice(self.vocab, size=2 * self.support, replace=False)
        conc = np.full(self.support, 0.5)
        out = ids[: self.support], rng.dirichlet(conc), ids[self.support :], rng.dirichlet(conc), float(rng.random())
        for a in out[:4]:
            a.setflags(write=False)  # shared by every caller through the cache
        return out

    def rank_coin(self, tokens: Sequence[int], rank: int) -> float:
        """A uniform number per (context, rank), independent of :meth:`draw`'s."""
        tail = tuple(tokens[-CONTEXT_WINDOW:])
        key = struct.pack(f"<QQQ{len(tail)}Q", self.seed & (2**64 - 1), len(tokens), rank, *tail)
        return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"dsi-rank").digest(), "little") / 2**64

    def sparse_row(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of non-zero probability after ``tokens``, ascending, and their logits."""
        ids, p = self.draw(tokens)[:2]
        order = np.argsort(ids)
        return ids[order], np.log(p[order])

    def choose(self, tokens: Sequence[int], params: SamplingParams, seed: int) -> int:
        """The decision rule's token after ``tokens`` (:func:`dsi.domain.sampling.choose`
        on :meth:`logits`), from the support alone where the rule allows."""
        token = sampling.choose_sparse(*self.sparse_row(tokens), self.vocab, params, seed, len(tokens))
        return sampling.choose(self.logits(tokens), params, seed, len(tokens)) if token is None else token

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        p_ids, p, _, _, _ = self.draw(tokens)
        out = np.full(self.vocab, -np.inf)
        out[p_ids] = np.log(p)
        return out


_lcp = common_prefix


class _State:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.first = True
        #: Passes shorter than the timer's millisecond not slept yet (negative: the emulation's CPU
        #: time, credited against the next sleep).
        self.owed_ms = 0.0


class TimerLateness:
    """How late ``asyncio.sleep`` returns in this process (a running mean):
    the event loop waits in whole milliseconds (epoll rounds its timeout up)
    and wakes up a little after that, so a 30 ms sleep takes about 30.6 ms.
    A synthetic model sleeps that much less, so that its passes take what its
    spec says on average: the wait of a modelled GPU, not the timer's error.
    On a virtual clock (dsi.tools.experiments.virtual_time) it stays 0.

    The default: it never blocks the loop, whatever else runs on it (the
    in-process clusters of tests and experiments run every service on one)."""

    ALPHA = 0.1
    #: A sample counts at most this late: the millisecond rounding and the wake-up. A loop busy with
    #: other work wakes later still, and that is the system's time, not the timer's: not corrected.
    MAX_S = 0.0012

    def __init__(self) -> None:
        self.seconds = 0.0

    def can_wait(self, ms: float) -> bool:
        """Whether a wait of ``ms`` is due now (else it is owed and waited with a later pass)."""
        return ms >= TIMER_MS

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        asked = max(0.0, seconds - self.seconds)
        start = loop.time()
        await asyncio.sleep(asked)
        late = min(self.MAX_S, max(0.0, loop.time() - start - asked))
        self.seconds += self.ALPHA * (late - self.seconds)


class PassTimer:
    """Waits as long as a modelled device's pass takes, to about 0.05 ms: for
    a model's own process (``dsi target``, ``dsi drafter``:
    :func:`time_passes_exactly`).

    The event loop's timer cannot: epoll waits whole milliseconds (Python
    rounds the timeout up) and the loop wakes 0.2-0.5 ms after that (a VM's
    idle vCPU halts), so ``asyncio.sleep(0.0196)`` and ``asyncio.sleep(0.0200)``
    both take ~20.4 ms, and :class:`TimerLateness`'s correction makes passes
    alternate between ~19.4 and ~20.4 ms. So a pass waits on the loop until
    :attr:`MARGIN_S` before its end, then blocks in ``time.sleep`` (the
    kernel's timer: late by a steady ~0.1 ms, learnt and asked that much less)
    and spins what is left, as a GPU host's thread waits in the device's
    synchronize: the process is awake when its pass ends, as a GPU server's
    is. Only while it is the process's one pass in progress: where passes
    overlap (a target serving many sessions without batching) each finishes
    on the loop's timer, so that none holds up another (:attr:`busy`).

    Not for a loop that runs other services too (an in-process cluster): the
    blocking finish holds up their work, and widened races there."""

    #: The loop's timer is asked to wake the pass this long before its end: its millisecond
    #: rounding (< 1 ms) and its wake-up (0.2-0.5 ms here), so that it wakes before the end.
    MARGIN_S = 0.0015
    ALPHA = 0.1
    #: ``time.sleep``'s lateness counts at most this much (a descheduled process wakes later still).
    MAX_LATE_S = 0.0005

    def __init__(self) -> None:
        self.late = 0.0001  # time.sleep's lateness, a running mean
        self.waiting = 0  # passes in progress in :meth:`sleep`

    @property
    def busy(self) -> bool:
        """Another pass is in progress (the caller's not counted)."""
        return self.waiting > 0

    def can_wait(self, ms: float) -> bool:
        """Whether a wait of ``ms`` is due now: any, unless another pass's wait is in progress
        (then it would be the loop's timer's, whole milliseconds)."""
        return ms > 0 and (ms >= TIMER_MS or not self.busy)

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if getattr(loop, "exact_timer", False):  # a virtual clock (dsi.tools.experiments.virtual_time)
            await asyncio.sleep(seconds)
            return
        end = loop.time() + seconds
        self.waiting += 1
        try:
            if seconds > self.MARGIN_S:
                await asyncio.sleep(seconds - self.MARGIN_S)
            left = end - loop.time()
            if left <= 0:
                return
            if self.waiting > 1:  # another pass is in progress: blocking would hold it up
                await asyncio.sleep(left)
                return
            asked = left - self.late
            if asked > 0:
                start = loop.time()
                time.sleep(asked)  # noqa: ASYNC251 (the point: block, as a device synchronize does)
                over = loop.time() - start - asked
                self.late += self.ALPHA * (min(self.MAX_LATE_S, max(0.0, over)) - self.late)
            while loop.time() < end:
                pass
        finally:
            self.waiting -= 1


#: One per event loop: the synthetic models on a loop share its timer.
_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TimerLateness | PassTimer] = weakref.WeakKeyDictionary()


def timer() -> TimerLateness | PassTimer:
    """The running loop's timer: a :class:`TimerLateness` unless :func:`time_passes_exactly` was called on it."""
    loop = asyncio.get_running_loop()
    t = _TIMERS.get(loop)
    if t is None:
        t = _TIMERS[loop] = TimerLateness()
    return t


def time_passes_exactly() -> None:
    """Time the synthetic models' passes on the running loop with a
    :class:`PassTimer`: for a process that serves one model (the target and
    drafter services' mains), never for a loop shared with other services."""
    _TIMERS[asyncio.get_running_loop()] = PassTimer()


#: The event loop's timer resolution (epoll waits whole milliseconds): a pass shorter than this
#: would take about this long (with a :class:`PassTimer`: while other passes are in progress), so its
#: time is owed and waited with later passes of its session. The emulation's own CPU time is
#: credited the same way, up to this much.
TIMER_MS = 1.0


class _Latency:
    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self._rand = random.Random()

    async def sleep(self, state: _State, extra_ms: float) -> float:
        return await self.sleep_batch([state], [extra_ms])

    def pass_ms(self, states: Sequence[_State], extra_ms: Sequence[float]) -> float:
        """The cost model of one pass over ``len(states)`` requests."""
        base = max(self.spec.ttft_ms if s.first else self.spec.tpot_ms for s in states)
        return base * (1.0 + self.spec.batch_slope * (len(states) - 1)) + sum(extra_ms)

    async def sleep_batch(self, states: Sequence[_State], extra_ms: Sequence[float]) -> float:
        """Wait for a pass over ``states``; returns its modelled seconds
        (what a device would have computed, whatever the timer did: on a
        virtual clock no real time passes, and a pass shorter than the
        timer's millisecond is owed and slept with a later one)."""
        ms = self.pass_ms(states, extra_ms)
        if self.spec.jitter_ms:
            ms += self._rand.uniform(0.0, self.spec.jitter_ms)
        for s in states:
            s.first = False
        if ms <= 0:  # a zero-latency model costs no event-loop wake-up
            return 0.0
        owed = max(s.owed_ms for s in states) + ms
        exact = getattr(asyncio.get_running_loop(), "exact_timer", False)  # a virtual clock's
        if not exact and not timer().can_wait(owed):  # owed, waited once it can be
            for s in states:
                s.owed_ms = max(owed, -TIMER_MS)
            return ms / 1000.0
        for s in states:
            s.owed_ms = 0.0
        await timer().sleep(owed / 1000.0)
        return ms / 1000.0

    @contextlib.contextmanager
    def charging(self, states: Sequence[_State]) -> Iterator[None]:
        """The emulation's own CPU time in this block (loop time: none on a
        virtual clock) counts towards the pass: its sessions' next sleeps are
        that much shorter, so a pass takes its spec, not its spec plus the
        pseudo model's arithmetic (0.3 ms per drafted token with 32k ids)."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        yield
        if self.spec.ttft_ms or self.spec.tpot_ms:
            spent_ms = (loop.time() - since) * 1000.0
            for s in states:
                s.owed_ms = max(s.owed_ms - spent_ms, -TIMER_MS)


class SparseRows:
    """Rows of logits that are ``-inf`` outside a small support: (ids
    ascending, logits there) per row. Decided without building dense rows
    (:func:`dsi.domain.sampling.choose_sparse`); ``np.asarray`` gives the
    dense rows."""

    def __init__(self, vocab: int, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.vocab = vocab
        self.rows = rows

    @classmethod
    def of(cls, lm: PseudoLM, prefixes: Sequence[Sequence[int]]) -> SparseRows:
        return cls(lm.vocab, [lm.sparse_row(prefix) for prefix in prefixes])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.vocab

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.full((len(self.rows), self.vocab), -np.inf, dtype=dtype or np.float64)
        for i, (ids, logits) in enumerate(self.rows):
            out[i, ids] = logits
        return out


class SyntheticTarget(TargetModel):
    def __init__(self, spec: str) -> None:
        self.spec = SyntheticSpec.parse(spec)
        self.info = self.spec.model_info(spec)
        self.lm = PseudoLM(self.spec.vocab, self.spec.seed, self.spec.support)
        self._latency = _Latency(self.spec)

    def new_state(self) -> _State:
        return _State()

    def _plan(self, state: _State, tokens: Sequence[int], num_rows: int) -> tuple[int, int, float]:
        """(cached, computed, per-token cost in ms) of a forward pass."""
        cached = min(_lcp(state.seen, tokens), len(tokens) - num_rows)
        computed = len(tokens) - cached
        catch_up = computed - num_rows  # context tokens this session had not seen here
        return cached, computed, self.spec.verify_token_ms * (num_rows - 1) + self.spec.prefill_token_ms * catch_up

    def _rows(self, state: _State, tokens: Sequence[int], num_rows: int) -> SparseRows:
        n = len(tokens)
        rows = SparseRows.of(self.lm, [tokens[: n - num_rows + 1 + i] for i in range(num_rows)])
        state.seen = list(tokens)
        return rows

    async def forward(self, state: _State, tokens: Sequence[int], num_rows: int) -> Forward:
        cached, computed, extra = self._plan(state, tokens, num_rows)
        seconds = await self._latency.sleep(state, extra)
        with self._latency.charging([state]):
            return Forward(self._rows(state, tokens, num_rows), cached, computed, seconds)

    def tokens_to_compute(self, state: _State, tokens: Sequence[int], num_rows: int) -> int:
        return self._plan(state, tokens, num_rows)[1]

    async def forward_batch(self, items: list[BatchItem]) -> list[Forward]:
        """One sleep for the whole batch (the cost model above); each
        request's rows are what :meth:`forward` gives it alone."""
        plans = [self._plan(i.state, i.tokens, i.num_rows) for i in items]
        states = [i.state for i in items]
        seconds = await self._latency.sleep_batch(states, [p[2] for p in plans])
        with self._latency.charging(states):
            return [
                Forward(self._rows(i.state, i.tokens, i.num_rows), cached, computed, seconds)
                for i, (cached, computed, _) in zip(items, plans, strict=True)
            ]

    async def forward_tree(
        self, state: _State, context: Sequence[int], tokens: Sequence[int], parents: Sequence[int]
    ) -> Forward:
        cached = min(_lcp(state.seen, context), len(context) - 1)
        catch_up = len(context) - 1 - cached
        extra = self.spec.verify_token_ms * len(tokens) + self.spec.prefill_token_ms * catch_up
        seconds = await self._latency.sleep(state, extra)
        paths: list[list[int]] = []
        for tok, parent in zip(tokens, parents, strict=True):
            paths.append([*(paths[parent] if parent != ROOT else []), tok])
        rows = SparseRows.of(self.lm, [context, *([*context, *p] for p in paths)])
        state.seen = [*context, *([-1] * len(tokens))]  # the tree is not a sequence: only the context is reusable
        return Forward(rows, cached, len(context) - cached + len(tokens), seconds)

    async def keep_path(
        self, state: _State, context: Sequence[int], path_tokens: Sequence[int], path: Sequence[int]
    ) -> None:
        state.seen = [*context, *path_tokens]

    async def decide(self, request: VerifyRequest, fwd: Forward) -> tuple[list[Decision], list[int], int]:
        """The rule on the sparse rows (the support only); top-p on dense rows."""
        rows = fwd.scores
        if not isinstance(rows, SparseRows) or request.sampling.top_p < 1.0:
            return await super().decide(request, fwd)
        params, seed, start = request.sampling, request.seed, len(request.context)
        parents, depth = sampling.tree_depths(request.drafts)
        chosen: dict[int, int] = {}

        def token_after(node: int) -> int:
            if node not in chosen:
                ids, logits = rows.rows[node + 1]
                position = start + (0 if node == ROOT else depth[node])
                token = sampling.choose_sparse(ids, logits, rows.vocab, params, seed, position)
                assert token is not None
                chosen[node] = token
            return chosen[node]

        return sampling.walk_tree(request.drafts, parents, token_after)


def drafter_right_along(spec: str, prompt: Sequence[int], output: Sequence[int]) -> np.ndarray:
    """Whether the synthetic drafter ``spec``'s first guess at each new
    position of ``output`` (the target's tokens after ``prompt``) is the
    target's token: its coin along the sequence the target chose. A
    generation's own accept/reject draws, for the simulator to replay
    (:func:`dsi.tools.experiments.simulate.simulate_one`), so that a run is
    compared with the model of the same draws and not only with their mean.
    Assumes the drafter's pair: a target of the same vocab and seed."""
    s = SyntheticSpec.parse(spec)
    coins = PseudoLM(s.vocab, s.seed if s.coin_seed < 0 else s.coin_seed, s.support)
    tokens = list(prompt)
    right = np.zeros(len(output), dtype=bool)
    for i, token in enumerate(output):
        right[i] = coins.draw(tokens)[4] < s.acceptance_at(len(tokens))
        tokens.append(token)
    return right


class SyntheticDrafter(DrafterModel):
    def __init__(self, spec: str) -> None:
        self.spec = SyntheticSpec.parse(spec)
        self.info = self.spec.model_info(spec)
        self.lm = PseudoLM(self.spec.vocab, self.spec.seed, self.spec.support)
        coin_seed = self.spec.seed if self.spec.coin_seed < 0 else self.spec.coin_seed
        # The same pseudo model when the seeds agree (the default): one draw per position, cached once.
        self.coins = self.lm if coin_seed == self.spec.seed else PseudoLM(self.spec.vocab, coin_seed, self.spec.support)
        self._latency = _Latency(self.spec)

    def new_state(self) -> _State:
        return _State()

    async def next_scores(
        self, state: _State, tokens: Sequence[int], params: SamplingParams, seed: int
    ) -> tuple[np.ndarray, Forward]:
        (guess,), fwd = await self.next_candidates(state, tokens, params, seed, 1)
        scores = np.full(self.spec.vocab, -np.inf)
        scores[guess] = 0.0  # every rule picks the one finite score
        return scores, Forward(scores[None, :], fwd.cached_tokens, fwd.computed_tokens, fwd.seconds)

    async def next_candidates(
        self, state: _State, tokens: Sequence[int], params: SamplingParams, seed: int, k: int
    ) -> tuple[list[int], Forward]:
        seconds = await self._latency.sleep(state, 0.0)
        with self._latency.charging([state]):
            return self._guesses(state, tokens, params, seed, k, seconds)

    async def next_candidates_batch(self, items: list[DraftItem]) -> list[tuple[list[int], Forward]]:
        states = [i.state for i in items]
        seconds = await self._latency.sleep_batch(states, [0.0] * len(items))
        with self._latency.charging(states):
            return [self._guesses(i.state, i.tokens, i.params, i.seed, i.k, seconds) for i in items]

    def _guesses(
        self, state: _State, tokens: Sequence[int], params: SamplingParams, seed: int, k: int, seconds: float
    ) -> tuple[list[int], Forward]:
        cached = min(_lcp(state.seen, tokens), len(tokens) - 1)
        state.seen = list(tokens)
        _, _, r_ids, r, _ = self.lm.draw(tokens)
        coin = self.coins.draw(tokens)[4]
        guesses = [int(t) for t in r_ids[np.argsort(-r, kind="stable")]][:k]  # tokens the target never picks
        rank = 0 if coin < self.spec.acceptance_at(len(tokens)) else None
        for i in range(1, k):
            if rank is None and self.coins.rank_coin(tokens, i) < self.spec.sibling_acceptance:
                rank = i
        if rank is not None:
            guesses.insert(rank, self.lm.choose(tokens, params, seed))
        empty = np.zeros((1, 0))
        return guesses[:k], Forward(empty, cached, len(tokens) - cached, seconds)
