"""The engine and what every strategy shares: one generation's committed
sequence, its statistics, its RPCs and their cleanup.

Nothing here knows about gRPC: targets and drafters are the interfaces of
:mod:`dsi.domain.interfaces`, implemented in-process by :mod:`dsi.backends`
and over the network by :mod:`dsi.wire.transport`.

Losslessness (docs/architecture.md): the token at every position is a
function of (seed, position, the target's distribution there)
(:mod:`dsi.domain.sampling`), so any verification whose assumed prefix equals
the committed prefix decides it the same way; each position is committed once.

Failover follows from the same rule: a verification whose replica fails (its
call ends UNAVAILABLE or RESOURCE_EXHAUSTED, or no answer comes within its
deadline) is simply issued again, with the same drafts, on another replica,
and decides the same tokens there. A drafter that fails leaves the generation
to target-only steps until an instance of its model answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from dsi.domain.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.types import CHAIN, DecodeRequest, DraftRequest, DraftToken, SamplingParams, VerifyRequest, VerifyResult
from services.coordinator.engine.drafters import DROP_AFTER, DrafterSlot, DrafterStats, Proposal
from services.coordinator.engine.lookahead import LARGEST, LookaheadPlanner
from services.coordinator.engine.observe import Observer, VerificationInfo
from services.coordinator.engine.trees import Alternatives
from services.coordinator.engine.types import FinishReason, GenerationParams, GenerationStats, Strategy
from services.coordinator.pool import Lease, Pool, clock

log = logging.getLogger("services.coordinator.engine")
T = TypeVar("T")

#: A verification's deadline: this many times its replica's measured latency, scaled up by the
#: tokens it must compute beyond what the replica caches (one more latency per PREFILL_BLOCK),
#: at least DEADLINE_FLOOR seconds and at most the engine's ``verify_timeout``.
DEADLINE_FACTOR, DEADLINE_FLOOR, PREFILL_BLOCK = 10.0, 2.0, 64
#: Weight of a decided draft in :attr:`Generation.recent_acceptance`.
RECENT_WEIGHT = 1 / 4


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``, or ``asyncio.TimeoutError`` after ``seconds``; in the
    calling task (``asyncio.timeout``, Python 3.11+: no task of its own, so
    cancelling the caller cancels the call at once, with nothing scheduled
    in between)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a generation's end failed: %r", task.exception())


#: Errors after which a call is tried elsewhere: the peer is gone, or saturated.
RETRYABLE = (Unavailable, ResourceExhausted)


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
        verify_timeout: float = 60.0,
        draft_timeout: float = 10.0,
    ) -> None:
        self.targets: Pool[Target] = Pool(list(targets), "target replica")
        self.drafters: Pool[Drafter] = Pool(list(drafters), "drafter")
        for i, t in enumerate(targets):  # in-process targets say how many requests share a pass
            self.targets.set_capacity(i, getattr(getattr(t, "limits", None), "max_batch", 1) or 1)
        self.eos = frozenset(eos_token_ids)
        self.max_context = max_context
        self.vocab_size = vocab_size
        #: Upper bound on target replicas used by one generation (0 = all).
        self.max_sp_degree = max_sp_degree
        self.max_draft_tokens = max_draft_tokens
        self.lead_chunks = lead_chunks
        self.release_timeout = release_timeout
        #: Seconds a verification may take on a replica whose latency is not measured yet, and at most.
        self.verify_timeout = verify_timeout
        #: Seconds a drafter may take to send its next chunk before it counts as failed.
        self.draft_timeout = draft_timeout
        #: Per primary drafter model, the last automatic-lookahead generation's measurements: where
        #: the next one starts (the same drafter and targets answer at the same speeds).
        self.lookahead_memory: dict[str, LookaheadPlanner] = {}
        #: Whether the drafters compute on their targets' device (one host, one device): drafting and
        #: verifying take turns there, so DSI's automatic lookahead is planned as SI's (set by the
        #: coordinator from what the services report).
        self.shared_device = False
        #: Drafter pool index -> the model it serves: instances of one model are replicas (a
        #: generation uses one of them), different models all work on every generation.
        #: Unset: the member's name.
        self.drafter_models: dict[int, str] = {}
        #: Generations' ends still running (their calls finishing, their sessions being released).
        self._ending: set[asyncio.Task[None]] = set()

    def drafter_model(self, i: int) -> str:
        """The model drafter instance ``i`` serves (its group)."""
        return self.drafter_models.get(i) or getattr(self.drafters.member(i), "name", str(i))

    def drafter_groups(self) -> list[list[int]]:
        """Active drafter instances by model, in the order the models were added."""
        groups: dict[str, list[int]] = {}
        for i in self.drafters.active():
            groups.setdefault(self.drafter_model(i), []).append(i)
        return list(groups.values())

    def drafter_model_names(self) -> list[str]:
        """Every drafter model with an instance in service or down (not drained), in order."""
        names = (self.drafter_model(i) for i, s in enumerate(self.drafters.slots) if not s.draining)
        return list(dict.fromkeys(names))

    async def finish(self, end: Coroutine[Any, Any, None]) -> None:
        """Run a generation's ``end`` (its strategy closed, its cancelled calls
        awaited, its sessions released) to completion whatever happens to the
        caller: a task cancelled again while it waits (a server stopping, a
        framework cancelling twice) would otherwise drop the releases, and every
        replica would hold the session, its KV cache, until the idle timeout."""
        task = asyncio.ensure_future(end)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # it goes on alone: nobody else will hear of its error
                task.add_done_callback(_log_failure)
            raise

    async def close(self) -> None:
        """Let the generations' ends finish (bounded), then stop the pools' health probes."""
        if self._ending:
            await asyncio.wait(set(self._ending), timeout=self.release_timeout + 1.0)
        await self.targets.close()
        await self.drafters.close()

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
        if not 0 <= params.lookahead <= self.max_draft_tokens:
            raise InvalidArgument(
                f"lookahead must lie in 1..{self.max_draft_tokens} (or 0: automatic), got {params.lookahead}"
            )
        if params.strategy is not Strategy.NONSI and not self.drafters.slots:
            raise InvalidArgument(f"strategy {params.strategy.value} needs a drafter and none is configured")

    def room(self, prompt: Sequence[int]) -> int:
        """New tokens that fit in the context after ``prompt``."""
        return self.max_context - len(prompt)

    @property
    def sp_degree(self) -> int:
        """Target replicas one generation may use at once."""
        n = len(self.targets)
        return min(n, self.max_sp_degree) if self.max_sp_degree else n

    def generate(self, prompt: Sequence[int], params: GenerationParams, observer: Observer | None = None) -> Generation:
        self.check(prompt, params)
        gen = Generation(self, list(prompt), params)
        gen.observer = observer
        return gen


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
        self.stats = GenerationStats(seed=params.seed)
        self.finish_reason: FinishReason | None = None
        #: Drafts for positions len(committed)...: what speculation assumes (the main path).
        self.pending: list[DraftToken] = []
        #: The drafter's alternatives at those positions (token trees).
        self.alternatives = Alternatives()
        #: The other drafters' guesses, by drafter (see drafters.py).
        self.proposals: dict[int, Proposal] = {}
        #: Called with every stale verification or stream to cancel: the strategy's hook.
        self.on_diverge: Callable[[], None] = lambda: None
        #: Cancelled tasks still finishing; awaited at cleanup.
        self.cancelled: set[asyncio.Task] = set()
        #: Hears of every verification, draft chunk and commit (timelines, traces); None = nobody.
        self.observer: Observer | None = None
        self._verification_ids = itertools.count()
        self._stream_ids = itertools.count()
        self._out: list[int] = []
        self._start = 0.0
        self._used_targets: set[int] = set()
        #: per target replica: how much of the assumed sequence its cache holds
        self._cached: dict[int, int] = {}
        self._slots: list[DrafterSlot] | None = None
        self._used_drafters: set[int] = set()  # every drafter instance it used (sessions to release)
        #: loop time by which the client wants its answer (its gRPC deadline); None = no deadline
        self.deadline: float | None = None
        #: Chooses the lookahead as the generation runs (``params.lookahead == 0``); None = fixed.
        self.planner: LookaheadPlanner | None = None
        self._memory_key = ""  # the planner's key in the engine's lookahead_memory
        if params.lookahead == 0:
            largest = min(LARGEST, engine.max_draft_tokens)
            # On a device the drafter shares with its targets, DSI's chunks do not overlap with drafting.
            dsi = params.strategy is Strategy.DSI and not engine.shared_device
            self.planner = LookaheadPlanner(dsi, self._measured_target, largest)
            models = engine.drafter_model_names()
            # Per strategy too: SI's and DSI's verifications and draft streams differ in size and number.
            self._memory_key = f"{params.strategy.value}:{models[0] if models else ''}"
            self.planner.resume(engine.lookahead_memory.get(self._memory_key))
        self._failures = 0  # failed calls since the last verification that completed
        #: The primary drafter's acceptance lately: a running mean over its decided drafts (0.5 before any).
        self.recent_acceptance = 0.5

    # --- public -------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def new_tokens(self) -> list[int]:
        return self.committed[self.prompt_len :]

    async def tokens(self) -> AsyncIterator[list[int]]:
        from services.coordinator.engine.dsi import run_dsi
        from services.coordinator.engine.sequential import run_nonsi, run_si

        self._start = time.perf_counter()
        runner = {Strategy.NONSI: run_nonsi, Strategy.SI: run_si, Strategy.DSI: run_dsi}[self.params.strategy]
        steps = runner(self)
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
            if self.planner is not None and self.planner.measured:
                self.engine.lookahead_memory[self._memory_key] = self.planner
            await self.engine.finish(self._end(steps))

    def stop(self, reason: FinishReason) -> None:
        """End the generation (e.g. a stop string was found)."""
        if self.finish_reason is None:
            self.finish_reason = reason

    # --- for the strategies ---------------------------------------------------

    @property
    def sampling(self) -> SamplingParams:
        return self.params.sampling

    @property
    def lookahead(self) -> int:
        """Drafts per chunk now: the request's, or the planner's current choice."""
        return self.params.lookahead or (self.planner.lookahead if self.planner else 1)

    @property
    def sp_degree(self) -> int:
        """Target replicas this generation keeps busy at most."""
        n = self.engine.sp_degree
        return min(n, self.planner.replicas) if self.planner and self.planner.replicas else n

    def _measured_target(self) -> tuple[float, int]:
        """Mean seconds per verification of the replicas in service (0 = none measured), and how many."""
        pool = self.engine.targets
        latencies = [pool.latency(i) for i in pool.active() if pool.latency(i)]
        return (sum(latencies) / len(latencies) if latencies else 0.0), self.engine.sp_degree

    def context(self, upto: int) -> list[int]:
        """The assumed sequence (committed, then pending drafts) up to ``upto``."""
        c = len(self.committed)
        return self.committed[:upto] if upto <= c else self.committed + [d.token_id for d in self.pending[: upto - c]]

    def commit(self, token: int) -> bool:
        """Commit ``token`` at the frontier; returns True when it differs from
        the pending draft there: everything speculated past it is stale, and
        :attr:`on_diverge` has cancelled it. If ``token`` is one of the
        drafter's alternatives there, its branch becomes the pending drafts."""
        position = len(self.committed)
        draft = self.pending[0].token_id if self.pending else None
        if self.observer is not None:
            self.observer.committed(position, token, draft, time.perf_counter())
        # Drafts that guessed ``token`` here, and what they guessed after it: the primary's
        # alternatives, the other drafters' proposals.
        branch = self.alternatives.take(position, token)
        tails = [branch[1:]] if branch is not None else []
        for proposal in self.proposals.values():
            guess = proposal.guess_at(position)
            if guess is None:
                continue
            proposal.slot.stats.decided += 1
            if guess != token:
                proposal.dead = True
                continue
            proposal.slot.stats.accepted += 1
            tails.append(proposal.tokens[position - proposal.start + 1 :])
            if draft != token:
                proposal.slot.stats.unique += 1
        diverged = False
        if draft is not None:
            self.pending.pop(0)
            self.stats.decided_drafts += 1
            primary = self._slots[0].stats if self._slots else None
            if primary is not None:
                primary.decided += 1
            if self.planner is not None:
                self.planner.decided(draft == token)
            self.recent_acceptance += RECENT_WEIGHT * ((draft == token) - self.recent_acceptance)
            if draft == token:
                self.stats.accepted_tokens += 1
                if primary is not None:
                    primary.accepted += 1
            else:
                diverged = True
                if tails:  # another guess was right: what follows it is drafted already
                    self.stats.accepted_tokens += 1
                    self.stats.alternative_hits += 1
        elif any(tails):  # no main guess here, another drafter's was right: speculate on it
            diverged = True
        self.committed.append(token)
        self._out.append(token)
        self.stats.new_tokens += 1
        if self._slots is not None and all(slot.lost or slot.stats.dropped for slot in self._slots):
            self.stats.tokens_without_drafter += 1
        if self.stats.new_tokens == 1:
            self.stats.time_to_first_token_seconds = time.perf_counter() - self._start
        if token in self.engine.eos:
            self.stop(FinishReason.EOS)
        elif len(self.committed) > self.last_pos:
            self.stop(FinishReason.LENGTH)
        self._drop_idle_drafters()
        if diverged:
            self.pending = [DraftToken(t) for t in max(tails, key=len, default=[])]
            self.alternatives.clear()  # the other alternatives and proposals followed the old main path
            self.proposals.clear()
            wrong_from = len(self.committed) - 1  # caches are valid only before the diverged position
            self._cached = {i: min(n, wrong_from) for i, n in self._cached.items()}
            self.on_diverge()
        return diverged

    async def verify(self, lease: Lease, base: int, drafts: list[DraftToken]) -> VerifyResult:
        """One Verify on the leased replica: the assumed context up to ``base``
        and ``drafts`` after it (:meth:`on_replica`)."""
        length = base + len(drafts)
        uncached = self._uncached(lease.replica, length)
        self._cached[lease.replica] = length  # what it holds once this is verified (others may look now)
        request = VerifyRequest(self.session_id, self.context(base), drafts, self.sampling, self.params.seed)
        pool = self.engine.targets
        target = pool.member(lease.replica)
        lease.tokens = uncached
        started = clock()
        result = await self.on_replica(lease, length, target.verify(request), uncached)
        pool.measured_pass(lease.replica, result.stats.computed_tokens, result.stats.compute_seconds)
        if self.planner is not None and uncached <= PREFILL_BLOCK:  # a long prefill says little about a chunk
            # Not the time it queued on the replica (behind a cancelled request's pass, which runs to its
            # end): that wait comes with the replica, not with the chunk's size.
            self.planner.verified(uncached, clock() - started - result.stats.queue_seconds)
        return result

    async def decode(self, replica: int) -> AsyncIterator[VerifyResult]:
        """Target-only decoding on ``replica`` from the committed sequence, up
        to the last position (:meth:`Target.decode`)."""
        self._used_targets.add(replica)
        c = len(self.committed)
        start = VerifyRequest(self.session_id, list(self.committed), (), self.sampling, self.params.seed)
        steps = self.engine.targets.member(replica).decode(DecodeRequest(start, self.last_pos - c + 1, self.engine.eos))
        try:
            async for result in steps:
                self._cached[replica] = len(self.committed)  # what its cache holds: the context of this step
                yield result
        finally:
            await steps.aclose()  # type: ignore[attr-defined]

    def _uncached(self, replica: int, length: int) -> int:
        """Tokens of the first ``length`` that ``replica`` must compute (its cache lacks them)."""
        return length - min(self._cached.get(replica, 0), length)

    async def on_replica(self, lease: Lease, length: int, awaitable: Awaitable[T], uncached: int | None = None) -> T:
        """``awaitable``, a call to the leased replica over ``length`` tokens
        (``uncached`` of them not in its cache; default: what :attr:`_cached`
        says now), within the replica's deadline. Releases the lease however
        it ends; a replica that failed is down until its health probe answers
        (see :meth:`retry_after`)."""
        pool = self.engine.targets
        if uncached is None:
            uncached = self._uncached(lease.replica, length)
        timeout = self._verify_timeout(lease.replica, uncached)
        self._used_targets.add(lease.replica)
        completed = unreachable = False
        try:
            result = await within(timeout, awaitable)
        except asyncio.TimeoutError:
            if self._past_deadline():  # the client's time is up, not the replica's fault
                raise DeadlineExceeded("the request's deadline passed") from None
            unreachable = True
            raise Unavailable(f"{pool.name(lease.replica)} is unavailable: no answer within {timeout:.3g}s") from None
        except Unavailable:
            unreachable = True
            raise
        else:
            completed = True
            self._failures = 0
            return result
        finally:
            # A long prefill is one pass per PREFILL_BLOCK tokens to the replica's measured latency.
            pool.release(lease, completed, unreachable, passes=uncached / PREFILL_BLOCK)

    def _verify_timeout(self, replica: int, uncached: int) -> float:
        """Seconds a verification that computes ``uncached`` tokens may take on ``replica``."""
        engine = self.engine
        limit = engine.verify_timeout
        latency = engine.targets.latency(replica)
        if latency:
            limit = min(limit, max(DEADLINE_FLOOR, DEADLINE_FACTOR * latency * (1 + uncached / PREFILL_BLOCK)))
        if self.deadline is not None:
            limit = min(limit, max(0.001, self.deadline - asyncio.get_running_loop().time()))
        return limit

    def _past_deadline(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline

    def retry_after(self, exc: BaseException) -> bool:
        """Whether a verification that failed with ``exc`` is to be issued
        again on another replica: yes for an unreachable or saturated replica,
        a bounded number of times in a row (every replica failing twice ends
        the generation with the last error)."""
        if not isinstance(exc, RETRYABLE):
            return False
        self._failures += 1
        if self._failures > 2 * len(self.engine.targets.slots):
            return False
        self.stats.failovers += 1
        log.warning("generation %s: %s; issuing it again on another replica", self.session_id, exc)
        return True

    def verification_info(self, replica: int, base: int, drafts: int, frontier: bool) -> VerificationInfo | None:
        """What an observer is told about a verification on ``replica`` (None without one)."""
        if self.observer is None:
            return None
        name = getattr(self.engine.targets.member(replica), "name", str(replica))
        info = VerificationInfo(
            next(self._verification_ids), replica, name, base, drafts, frontier, time.perf_counter()
        )
        self.observer.verification_started(info)
        return info

    def next_stream_id(self) -> int:
        return next(self._stream_ids)

    def affinity(self, base: int) -> Callable[[int], int]:
        """How many of the first ``base`` tokens replica ``i`` has cached."""
        return lambda i: min(self._cached.get(i, 0), base)

    def drafter_slots(self) -> list[DrafterSlot]:
        """The drafters this generation uses (leased on first use): one
        instance of every drafter model, the primary first. A model with no
        instance in service now gets a lost slot (see :meth:`reattach`)."""
        if self._slots is None:
            self._slots = []
            for index, model in enumerate(self.engine.drafter_model_names()):
                slot = DrafterSlot(index, model, None, None, DrafterStats(model))
                self._slots.append(slot)
                if self.reattach(slot):
                    slot.stats.drafter = getattr(slot.client, "name", model)
            self.stats.drafters = [s.stats for s in self._slots]
        return self._slots

    def reattach(self, slot: DrafterSlot) -> bool:
        """Give a lost slot an instance of its model that is in service; True
        if it has one now."""
        if not slot.lost:
            return True
        pool = self.engine.drafters
        group = [i for i in pool.active() if self.engine.drafter_model(i) == slot.model]
        if not group:
            return False
        slot.lease = pool.acquire_on(min(group, key=pool.in_flight))
        slot.client = pool.member(slot.lease.replica)
        self._used_drafters.add(slot.lease.replica)
        return True

    def drafter_failed(self, slot: DrafterSlot, exc: BaseException) -> None:
        """A drafter's stream failed: the generation goes on without it (and
        reattaches it, or another instance of its model, once one is in
        service). Errors other than an unreachable or saturated drafter are
        raised."""
        if not isinstance(exc, RETRYABLE):
            raise exc
        if self._past_deadline():  # the client's time is up, not the drafter's fault
            raise DeadlineExceeded("the request's deadline passed") from exc
        lease = slot.lease
        slot.client = slot.lease = None
        self.stats.drafter_failures += 1
        if lease is not None:
            self.engine.drafters.release(lease, unreachable=isinstance(exc, Unavailable))
        log.warning("generation %s: %s; going on without it", self.session_id, exc)

    def draft_timeout(self) -> float:
        """Seconds a drafter may take for its next chunk."""
        limit = self.engine.draft_timeout
        if self.deadline is not None:
            limit = min(limit, max(0.001, self.deadline - asyncio.get_running_loop().time()))
        return limit

    def _drop_idle_drafters(self) -> None:
        for slot in self._slots or ():
            st = slot.stats
            if not slot.primary and not st.dropped and st.decided >= DROP_AFTER and st.unique == 0:
                st.dropped = True
                self.proposals.pop(slot.index, None)

    def draft_request(self, context: list[int], max_tokens: int, primary: bool = True) -> DraftRequest:
        """Only the primary drafts token trees; the others' guesses are branches already."""
        return DraftRequest(
            self.session_id,
            context,
            self.lookahead,
            max_tokens,
            self.sampling,
            self.params.seed,
            self.params.tree if primary else CHAIN,
        )

    def close_stream(self, stream: AsyncIterator, reader: asyncio.Task | None) -> None:
        """Close a server stream whose next message ``reader`` may still be
        awaiting: cancel that read first (a stream cannot close while it is
        read), then close it; done before cleanup ends."""

        async def close() -> None:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            with contextlib.suppress(BaseException):
                await stream.aclose()  # type: ignore[attr-defined]

        self.cancelled.add(asyncio.ensure_future(close()))

    def cancel(self, task: asyncio.Task) -> bool:
        """Cancel ``task`` if still running; True if it was."""
        if task.done():
            return False
        task.cancel()
        self.cancelled.add(task)
        return True

    # --- cleanup --------------------------------------------------------------

    async def _end(self, steps: AsyncIterator[None]) -> None:
        await steps.aclose()  # type: ignore[attr-defined]
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self.cancelled:
            await asyncio.gather(*self.cancelled, return_exceptions=True)
        for slot in self._slots or ():
            if slot.lease is not None:
                self.engine.drafters.release(slot.lease)
        # Not on peers that are down: they lost the session, or will drop it when idle.
        releases = [
            pool.member(i).release_session(self.session_id)
            for pool, used in ((self.engine.targets, self._used_targets), (self.engine.drafters, self._used_drafters))
            for i in used
            if not pool.slots[i].down
        ]
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
