"""The generation engine: non-SI, SI and DSI over abstract Target/Drafter.

Nothing here knows about gRPC: targets and drafters are the interfaces of
:mod:`dsi.domain.interfaces`, implemented in-process by :mod:`dsi.backends` and over
the network by :mod:`dsi.wire.transport`.

Losslessness (DESIGN.md): every sequence position is decided exactly once, by
one verification whose assumed prefix equals the committed prefix, and the
choice of that verification never looks at what it decided. The target makes
each decision with random numbers keyed by (seed, position), so the decision
itself does not depend on which replica makes it.

DSI's choice rule for the frontier position ``C`` (the first undecided one):

* greedy: the first valid verification covering ``C`` to complete decides it
  (every one would pick the same argmax; the earliest is the fastest);
* sampling: if a valid verification with a *draft* at ``C`` has been issued, it
  decides ``C`` (speculative sampling keeps the drafter's token with
  probability min(1, p/q)); otherwise the first valid verification to complete
  with ``C`` as its bonus position (or a zero-draft frontier step) decides it
  by sampling from p. Issue and completion order are timing, not outcomes.

A frontier step is issued whenever no live verification covers ``C``, so a
target forward pass is always working on the frontier: DSI is never slower
than non-SI beyond its own overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from dsi.domain.errors import Internal, InvalidArgument, Unavailable
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.types import GREEDY, DraftChunk, DraftRequest, DraftToken, SamplingParams, VerifyRequest, VerifyResult
from services.coordinator.pool import Lease, Pool

log = logging.getLogger(__name__)


class Strategy(str, Enum):
    NONSI = "nonsi"
    SI = "si"
    DSI = "dsi"


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    seed: int = 0
    strategy: Strategy = Strategy.DSI
    lookahead: int = 5


@dataclass
class GenerationStats:
    new_tokens: int = 0
    wall_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    target_forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    #: drafted tokens whose position was decided while they were the draft there
    decided_drafts: int = 0
    verifications_started: int = 0
    verifications_cancelled: int = 0
    preemptions: int = 0
    draft_streams: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.decided_drafts if self.decided_drafts else 0.0

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = dict(vars(self))
        out["acceptance_rate"] = self.acceptance_rate
        return out


@dataclass(eq=False)
class _Verification:
    seq: int
    base: int  # sequence position of the first draft (= length of the context sent)
    drafts: list[DraftToken]
    lease: Lease
    task: asyncio.Task[VerifyResult] = field(init=False)
    result: VerifyResult | None = None
    done_order: int = -1

    @property
    def end(self) -> int:
        """The bonus position: decided by sampling from p when all drafts pass."""
        return self.base + len(self.drafts)

    def covers(self, pos: int) -> bool:
        return self.base <= pos <= self.end

    def has_draft_at(self, pos: int) -> bool:
        return self.base <= pos < self.end


class Engine:
    """Runs generations on a set of target replicas and drafters."""

    def __init__(
        self,
        targets: Sequence[Target],
        drafters: Sequence[Drafter] = (),
        *,
        eos_token_ids: Sequence[int] = (),
        max_context: int,
        vocab_size: int,
        max_sp_degree: int = 0,
        max_draft_tokens: int = 64,
        lead_chunks: int = 2,
        release_timeout: float = 5.0,
    ) -> None:
        self.targets: Pool[Target] = Pool(list(targets), "target replica")
        self.drafters: Pool[Drafter] = Pool(list(drafters), "drafter")
        self.eos = frozenset(eos_token_ids)
        self.max_context = max_context
        self.vocab_size = vocab_size
        #: Upper bound on target replicas used by one generation (0 = all).
        self.max_sp_degree = max_sp_degree
        self.max_draft_tokens = max_draft_tokens
        self.lead_chunks = lead_chunks
        self.release_timeout = release_timeout

    def check(self, prompt: Sequence[int], params: GenerationParams) -> None:
        if not prompt:
            raise InvalidArgument("the prompt is empty: give a prompt or prompt_token_ids")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if params.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens must be >= 1")
        if len(prompt) + params.max_new_tokens > self.max_context:
            raise InvalidArgument(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={params.max_new_tokens} exceeds the"
                f" context limit of {self.max_context} tokens"
            )
        if not 1 <= params.lookahead <= self.max_draft_tokens:
            raise InvalidArgument(f"lookahead must lie in 1..{self.max_draft_tokens}, got {params.lookahead}")
        if params.strategy is not Strategy.NONSI and not self.drafters.slots:
            raise InvalidArgument(f"strategy {params.strategy.value} needs a drafter and none is configured")

    @property
    def sp_degree(self) -> int:
        """Target replicas one generation may use at once."""
        n = len(self.targets)
        return min(n, self.max_sp_degree) if self.max_sp_degree else n

    def generate(self, prompt: Sequence[int], params: GenerationParams) -> Generation:
        self.check(prompt, params)
        return Generation(self, list(prompt), params)


class Generation:
    """One request. Iterate :meth:`tokens` for lists of newly committed
    tokens; afterwards :attr:`finish_reason` and :attr:`stats` are set.
    Closing the iteration early cancels every RPC of the request and releases
    its sessions."""

    def __init__(self, engine: Engine, prompt: list[int], params: GenerationParams) -> None:
        self.engine = engine
        self.params = params
        self.session_id = f"gen-{uuid.uuid4().hex}"
        self.prompt_len = len(prompt)
        self.committed: list[int] = list(prompt)
        self.last_pos = len(prompt) + params.max_new_tokens - 1  # last position to generate
        self.stats = GenerationStats()
        self.finish_reason: FinishReason | None = None
        self._out: list[int] = []
        self._start = 0.0
        self._used_targets: set[int] = set()
        #: per target replica: how much of the assumed sequence its cache holds
        self._cached: dict[int, int] = {}
        self._drafter_lease: Lease | None = None
        self._tasks: set[asyncio.Task] = set()
        # DSI state
        self.pending: list[DraftToken] = []  # drafts for positions len(committed)...
        self.verifs: list[_Verification] = []
        self._seq = itertools.count()
        self._done = itertools.count()
        self._stream: AsyncIterator[DraftChunk] | None = None
        self._reader: asyncio.Task[DraftChunk] | None = None

    # --- public -------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def new_tokens(self) -> list[int]:
        return self.committed[self.prompt_len :]

    async def tokens(self) -> AsyncIterator[list[int]]:
        self._start = time.perf_counter()
        runner = {Strategy.NONSI: self._nonsi, Strategy.SI: self._si, Strategy.DSI: self._dsi}[self.params.strategy]
        steps = runner()
        try:
            async for _ in steps:
                if self._out:
                    out, self._out = self._out, []
                    yield out
            if self._out:
                out, self._out = self._out, []
                yield out
        finally:
            self.stats.wall_seconds = time.perf_counter() - self._start
            await steps.aclose()
            await self._cleanup()

    def stop(self, reason: FinishReason) -> None:
        """End the generation (e.g. a stop string was found)."""
        if self.finish_reason is None:
            self.finish_reason = reason

    # --- shared -------------------------------------------------------------

    @property
    def _sampling(self) -> SamplingParams:
        return self.params.sampling

    def _context(self, upto: int) -> list[int]:
        """The assumed sequence (committed, then pending drafts) up to ``upto``."""
        c = len(self.committed)
        return self.committed[:upto] if upto <= c else self.committed + [d.token_id for d in self.pending[: upto - c]]

    def _commit(self, token: int) -> bool:
        """Commit ``token`` at the frontier; returns True when it differs from
        the pending draft there (everything speculated past it is stale)."""
        diverged = False
        if self.pending:
            draft = self.pending.pop(0)
            self.stats.decided_drafts += 1
            if draft.token_id == token:
                self.stats.accepted_tokens += 1
            else:
                diverged = True
        self.committed.append(token)
        self._out.append(token)
        self.stats.new_tokens += 1
        if self.stats.new_tokens == 1:
            self.stats.time_to_first_token_seconds = time.perf_counter() - self._start
        if token in self.engine.eos:
            self.stop(FinishReason.EOS)
        elif len(self.committed) > self.last_pos:
            self.stop(FinishReason.LENGTH)
        if diverged:
            self._diverge()
        return diverged

    async def _verify(self, lease: Lease, base: int, drafts: list[DraftToken]) -> VerifyResult:
        self._used_targets.add(lease.replica)
        self._cached[lease.replica] = base + len(drafts)
        request = VerifyRequest(self.session_id, self._context(base), drafts, self._sampling, self.params.seed)
        completed = unreachable = False
        try:
            result = await self.engine.targets.member(lease.replica).verify(request)
            completed = True
            return result
        except Unavailable:
            unreachable = True  # later generations avoid it for a while; this one fails, naming it
            raise
        finally:
            self.engine.targets.release(lease, completed, unreachable)

    def _affinity(self, base: int) -> Callable[[int], int]:
        """How many of the first ``base`` tokens replica ``i`` has cached."""
        return lambda i: min(self._cached.get(i, 0), base)

    def _drafter(self) -> Drafter:
        pool = self.engine.drafters
        if self._drafter_lease is None:
            self._drafter_lease = pool.acquire_on(pool.least_loaded())
        return pool.member(self._drafter_lease.replica)

    def _draft_request(self, context: list[int], max_tokens: int) -> DraftRequest:
        return DraftRequest(
            self.session_id, context, self.params.lookahead, max_tokens, self._sampling, self.params.seed
        )

    # --- non-SI and SI --------------------------------------------------------

    def _sequential_replica(self, current: int | None) -> int:
        """Non-SI and SI stay on one replica (its cache) unless it is drained."""
        pool = self.engine.targets
        return current if current is not None and pool.is_active(current) else pool.least_loaded()

    async def _nonsi(self) -> AsyncIterator[None]:
        replica = None
        while not self.finished:
            replica = self._sequential_replica(replica)
            result = await self._verify(self.engine.targets.acquire_on(replica), len(self.committed), [])
            self.stats.verifications_started += 1
            self.stats.target_forward_passes += 1
            self._commit(result.next_token)
            yield None

    async def _si(self) -> AsyncIterator[None]:
        replica = None
        drafter = self._drafter()
        while not self.finished:
            replica = self._sequential_replica(replica)
            c = len(self.committed)
            k = min(self.params.lookahead, self.last_pos - c)
            drafts: list[DraftToken] = []
            if k > 0:
                self.stats.draft_streams += 1
                stream = drafter.draft(self._draft_request(list(self.committed), k))
                try:
                    async for chunk in stream:
                        drafts.extend(chunk.tokens)
                finally:
                    await stream.aclose()  # type: ignore[attr-defined]
                self.stats.drafted_tokens += len(drafts)
            result = await self._verify(self.engine.targets.acquire_on(replica), c, drafts)
            self.stats.verifications_started += 1
            self.stats.target_forward_passes += 1
            self.pending = list(drafts)
            for d in drafts[: result.num_accepted]:
                if self.finished:
                    break
                self._commit(d.token_id)
            if not self.finished:
                self._commit(result.next_token)
            self.pending = []
            yield None

    # --- DSI ----------------------------------------------------------------

    @property
    def _max_lead(self) -> int:
        return self.params.lookahead * (self.engine.sp_degree + self.engine.lead_chunks)

    async def _dsi(self) -> AsyncIterator[None]:
        while not self.finished:
            self._dispatch()
            self._ensure_stream()
            waits: set[asyncio.Future] = {v.task for v in self.verifs if v.result is None}
            if self._reader is not None:
                waits.add(self._reader)
            if not waits:
                raise Internal("DSI has nothing in flight (bug)")
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for v in sorted((v for v in self.verifs if v.task in done), key=lambda v: v.seq):
                self._on_verified(v)
            if self._reader is not None and self._reader in done:
                self._on_chunk(self._reader)
            self._resolve()
            yield None

    def _issue(self, base: int, drafts: list[DraftToken], lease: Lease) -> _Verification:
        v = _Verification(next(self._seq), base, drafts, lease)
        v.task = asyncio.ensure_future(self._verify(lease, base, drafts))
        self.verifs.append(v)
        self.stats.verifications_started += 1
        return v

    def _cancel(self, v: _Verification) -> bool:
        """Cancel ``v`` if still in flight; True if it was."""
        if v.result is None and not v.task.done():
            v.task.cancel()
            self._tasks.add(v.task)
            return True
        return False

    def _preempt(self, victim: _Verification) -> None:
        """The pool took ``victim``'s replica for another generation's
        frontier step; its drafts (and any after them) go back to waiting."""
        for v in [w for w in self.verifs if w.base >= victim.base and w.result is None]:
            self.verifs.remove(v)
            if self._cancel(v):
                self.stats.preemptions += 1
            self.engine.targets.release(v.lease)

    def _dispatch(self) -> None:
        c = len(self.committed)
        if self.finished or c > self.last_pos:
            return
        pool = self.engine.targets
        if not self.verifs:  # nothing covers the frontier: a frontier step, now
            n = min(len(self.pending), self.engine.max_draft_tokens, self.last_pos + 1 - c)
            lease, _ = pool.acquire_frontier(self._affinity(c))
            self._issue(c, self.pending[:n], lease)
        while len(self.verifs) < self.engine.sp_degree:
            start = max(v.end for v in self.verifs)
            avail = self.pending[start - c : self.last_pos + 1 - c]
            if not avail or (len(avail) < self.params.lookahead and self._more_drafts_coming()):
                return
            holder: list[_Verification] = []
            lease = pool.acquire_idle(
                depth=lambda s=start: s - len(self.committed),
                preempt=lambda h=holder: self._preempt(h[0]),
                affinity=self._affinity(start),
            )
            if lease is None:
                return
            holder.append(self._issue(start, avail[: self.engine.max_draft_tokens], lease))

    def _more_drafts_coming(self) -> bool:
        end = len(self.committed) + len(self.pending)
        return end <= self.last_pos and not (self.pending and self.pending[-1].token_id in self.engine.eos)

    def _ensure_stream(self) -> None:
        if self._stream is not None or self.finished or not self._more_drafts_coming():
            return
        room = self._max_lead - len(self.pending)
        if room < self.params.lookahead:
            return  # far enough ahead; resume when verifications catch up
        end = len(self.committed) + len(self.pending)
        self._stream = self._drafter().draft(
            self._draft_request(self._context(end), min(room, self.last_pos + 1 - end))
        )
        self._reader = asyncio.ensure_future(self._stream.__anext__())
        self.stats.draft_streams += 1

    def _stop_stream(self) -> None:
        stream, reader = self._stream, self._reader
        self._stream = self._reader = None
        if stream is None:
            return

        async def close() -> None:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            with contextlib.suppress(BaseException):
                await stream.aclose()  # type: ignore[attr-defined]

        self._tasks.add(asyncio.ensure_future(close()))

    def _on_chunk(self, reader: asyncio.Task[DraftChunk]) -> None:
        if reader.cancelled():
            return
        exc = reader.exception()
        if isinstance(exc, StopAsyncIteration):
            self._stream = self._reader = None
            return
        if exc is not None:
            raise exc
        chunk = reader.result()
        self.stats.drafted_tokens += len(chunk.tokens)
        c = len(self.committed)
        pos = chunk.start_position
        for tok in chunk.tokens:
            end = c + len(self.pending)
            if pos < end:  # the frontier overtook the drafter: compare with what is known
                known = self.committed[pos] if pos < c else self.pending[pos - c].token_id
                if known != tok.token_id:
                    self._stop_stream()  # drafted from a stale prefix
                    return
            elif pos == end and pos <= self.last_pos:
                self.pending.append(tok)
            pos += 1
        assert self._stream is not None
        self._reader = asyncio.ensure_future(self._stream.__anext__())

    def _on_verified(self, v: _Verification) -> None:
        if v.task.cancelled():
            return
        exc = v.task.exception()
        if exc is not None:
            raise exc
        v.result = v.task.result()
        v.done_order = next(self._done)
        self.stats.target_forward_passes += 1

    def _diverge(self) -> None:
        """The committed token differs from the draft: all speculation
        built on it is stale. Cancel it and restart drafting."""
        self.pending.clear()
        wrong_from = len(self.committed) - 1  # caches are valid only before the diverged position
        self._cached = {i: min(n, wrong_from) for i, n in self._cached.items()}
        for v in self.verifs:
            if self._cancel(v):
                self.stats.verifications_cancelled += 1
            self.engine.targets.release(v.lease)
        self.verifs.clear()
        self._stop_stream()

    def _decider(self, c: int) -> _Verification | None:
        """The verification that decides position ``c`` now, or None to wait."""
        candidates = [v for v in self.verifs if v.covers(c)]
        if not self._sampling.greedy:
            drafted = [v for v in candidates if v.has_draft_at(c)]
            if drafted:
                return drafted[0] if drafted[0].result is not None else None
        completed = [v for v in candidates if v.result is not None]
        return min(completed, key=lambda v: v.done_order) if completed else None

    def _resolve(self) -> None:
        while not self.finished:
            c = len(self.committed)
            v = self._decider(c)
            if v is None:
                break
            assert v.result is not None
            self.verifs.remove(v)
            epoch_broken = False
            pos = c
            while pos < v.end and not self.finished:
                decision = v.result.decisions[pos - v.base]
                epoch_broken = self._commit(decision.token_id)
                if epoch_broken or not decision.accepted:
                    break
                pos += 1
            if pos == v.end and not epoch_broken and not self.finished and v.result.num_accepted == len(v.drafts):
                # v's bonus token: in sampling mode a verification with a draft
                # here, already issued, has the say instead.
                if self._sampling.greedy or not any(w.has_draft_at(pos) for w in self.verifs):
                    self._commit(v.result.next_token)
            # Verifications whose every position is decided are useless now.
            c = len(self.committed)
            for w in [w for w in self.verifs if w.end < c]:
                self.verifs.remove(w)
                if self._cancel(w):
                    self.stats.verifications_cancelled += 1
                self.engine.targets.release(w.lease)

    # --- cleanup --------------------------------------------------------------

    async def _cleanup(self) -> None:
        for v in self.verifs:
            self._cancel(v)
            self.engine.targets.release(v.lease)
        self.verifs.clear()
        self._stop_stream()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        releases = [self.engine.targets.member(i).release_session(self.session_id) for i in self._used_targets]
        if self._drafter_lease is not None:
            self.engine.drafters.release(self._drafter_lease)
            releases.append(self.engine.drafters.member(self._drafter_lease.replica).release_session(self.session_id))
        if releases:
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*releases, return_exceptions=True), self.engine.release_timeout
                )
            except asyncio.TimeoutError:
                log.warning("releasing session %s timed out", self.session_id)
            else:
                for r in results:
                    if isinstance(r, BaseException):
                        log.warning("releasing session %s failed: %s", self.session_id, r)
