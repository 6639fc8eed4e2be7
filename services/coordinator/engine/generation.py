"""The engine and what every strategy shares: one generation's committed
sequence, its statistics, its RPCs and their cleanup.

Nothing here knows about gRPC: targets and drafters are the interfaces of
:mod:`dsi.domain.interfaces`, implemented in-process by :mod:`dsi.backends`
and over the network by :mod:`dsi.wire.transport`.

Losslessness (docs/architecture.md): the token at every position is a
function of (seed, position, the target's distribution there)
(:mod:`dsi.domain.sampling`), so any verification whose assumed prefix equals
the committed prefix decides it the same way; each position is committed once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from dsi.domain.errors import InvalidArgument, Unavailable
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.types import CHAIN, DraftRequest, DraftToken, SamplingParams, VerifyRequest, VerifyResult
from services.coordinator.engine.drafters import DROP_AFTER, DrafterSlot, DrafterStats, Proposal
from services.coordinator.engine.observe import Observer, VerificationInfo
from services.coordinator.engine.trees import Alternatives
from services.coordinator.engine.types import FinishReason, GenerationParams, GenerationStats, Strategy
from services.coordinator.pool import Lease, Pool

log = logging.getLogger("services.coordinator.engine")


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
        #: Drafter pool index -> the model it serves: instances of one model are replicas (a
        #: generation uses one of them), different models all work on every generation.
        #: Unset: the member's name.
        self.drafter_models: dict[int, str] = {}

    def drafter_groups(self) -> list[list[int]]:
        """Active drafter instances by model, in the order the models were added."""
        groups: dict[str, list[int]] = {}
        for i in self.drafters.active():
            key = self.drafter_models.get(i) or getattr(self.drafters.member(i), "name", str(i))
            groups.setdefault(key, []).append(i)
        return list(groups.values())

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
            await steps.aclose()
            await self._cleanup()

    def stop(self, reason: FinishReason) -> None:
        """End the generation (e.g. a stop string was found)."""
        if self.finish_reason is None:
            self.finish_reason = reason

    # --- for the strategies ---------------------------------------------------

    @property
    def sampling(self) -> SamplingParams:
        return self.params.sampling

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
        and ``drafts`` after it. Releases the lease however it ends."""
        self._used_targets.add(lease.replica)
        self._cached[lease.replica] = base + len(drafts)
        request = VerifyRequest(self.session_id, self.context(base), drafts, self.sampling, self.params.seed)
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

    def verification_info(self, lease: Lease, base: int, drafts: int, frontier: bool) -> VerificationInfo | None:
        """What an observer is told about a verification (None without one)."""
        if self.observer is None:
            return None
        name = getattr(self.engine.targets.member(lease.replica), "name", str(lease.replica))
        info = VerificationInfo(
            next(self._verification_ids), lease.replica, name, base, drafts, frontier, time.perf_counter()
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
        instance of every drafter model, the primary first."""
        if self._slots is None:
            pool = self.engine.drafters
            groups = self.engine.drafter_groups()
            if not groups:
                raise Unavailable("no drafter is available")
            self._slots = []
            for index, group in enumerate(groups):
                lease = pool.acquire_on(min(group, key=pool.in_flight))
                client = pool.member(lease.replica)
                name = getattr(client, "name", str(lease.replica))
                self._slots.append(DrafterSlot(index, client, lease, DrafterStats(name)))
            self.stats.drafters = [s.stats for s in self._slots]
        return self._slots

    def drafter(self) -> Drafter:
        """The primary drafter."""
        return self.drafter_slots()[0].client

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
            self.params.lookahead,
            max_tokens,
            self.sampling,
            self.params.seed,
            self.params.tree if primary else CHAIN,
        )

    def cancel(self, task: asyncio.Task) -> bool:
        """Cancel ``task`` if still running; True if it was."""
        if task.done():
            return False
        task.cancel()
        self.cancelled.add(task)
        return True

    # --- cleanup --------------------------------------------------------------

    async def _cleanup(self) -> None:
        if self.cancelled:
            await asyncio.gather(*self.cancelled, return_exceptions=True)
        releases = [self.engine.targets.member(i).release_session(self.session_id) for i in self._used_targets]
        for slot in self._slots or ():
            self.engine.drafters.release(slot.lease)
            releases.append(slot.client.release_session(self.session_id))
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
