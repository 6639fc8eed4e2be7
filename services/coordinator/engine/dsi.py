"""DSI: drafting never waits for verification; chunks of drafts are verified
on idle target replicas while drafting goes on; stale work is cancelled.

State: the committed sequence, the pending drafts after it (all consistent
with it), the live verifications, and one Draft stream (:mod:`.drafting`).
A verification with base ``b`` and ``n`` drafts assumes the sequence up to
``b`` and computes the target's token at positions ``b .. b + n`` (its
*span*). Every live verification's assumptions hold so far: a committed token
that differs from the pending draft cancels all of them.

* **Deciding.** The frontier position ``C`` (the first undecided one) is
  decided by the first live verification covering it to complete. Any of them
  would give the same token (the decision rule, :mod:`dsi.domain.sampling`),
  so the choice, which depends on timing, carries no information.
* **Frontier step.** Whenever no live verification covers ``C``, one is issued
  at once at base ``C`` (with whatever drafts are pending), preempting another
  generation's speculation if no replica is idle. So a target forward pass is
  always working on the frontier: DSI is never slower than non-SI beyond its
  own overhead. Where the verifications that cover ``C`` are all expected to
  answer clearly later than a step would on an idle replica (a long chunk on
  a target that computes every draft, a slower replica), one goes beside
  them on that replica, without drafts, if that pays at the drafters' recent
  acceptance. The second frontier step in a row without drafts to verify
  (drafts that keep being wrong) is a Decode stream (:class:`FrontierDecoder`):
  while it keeps deciding the frontier with no drafts there, its replica
  decodes on, the next pass already running while a token travels, as
  non-SI's does; once other verifications cover the frontier (unless going
  on beside them pays, as above), or it falls behind, it stops. (A Decode
  call costs more to start than a Verify on the open stream: the first such
  step is a Verify.)
* **Speculative chunks.** On idle replicas, up to the SP degree, a chunk
  starts at the first position where no live verification carries a draft
  (the previous chunk's bonus position), once ``lookahead`` drafts are pending
  there (or as many as fit before the next verification or the end).
* **Preemption** removes only the preempted chunk; its drafts are the first
  ones no verification carries, so a later chunk, or a frontier step when the
  frontier reaches them, covers them again.
* **Failover** is the same: a verification whose replica failed is removed,
  and its span is covered again, on another replica, with the same drafts.
  Whether it failed never depends on what it would have decided.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dsi.domain.errors import Internal, Unavailable
from dsi.domain.types import DraftToken, VerifyResult
from services.coordinator.engine.drafting import DraftFeed, more_drafts_coming
from services.coordinator.engine.generation import Generation
from services.coordinator.engine.observe import Outcome, VerificationInfo
from services.coordinator.engine.trees import verification_tree
from services.coordinator.pool import Lease, clock

#: A frontier step beside a late verification (:meth:`DsiRun._hedge`) must gain at least this share of its time.
HEDGE_MARGIN = 0.2


@dataclass(eq=False)
class Verification:
    seq: int
    base: int  # first position it decides (= length of the context sent)
    drafts: list[DraftToken]  # a tree: the main path and the alternatives at its positions
    main: int  # main-path drafts among them (for positions base .. base + main - 1)
    lease: Lease
    task: asyncio.Task[VerifyResult] = field(init=False)
    result: VerifyResult | None = None
    done_order: int = -1
    info: VerificationInfo | None = None  # what the observer was told
    decoder: FrontierDecoder | None = None  # one step of a Decode stream (no drafts)

    @property
    def end(self) -> int:
        """The last position it surely decides (the token after its main path;
        a path through an alternative's branch may decide more)."""
        return self.base + self.main

    def tokens(self) -> list[int]:
        """What it decided, from ``base`` on: its accepted path, then the
        target's token after it."""
        assert self.result is not None
        return [*(self.drafts[i].token_id for i in self.result.path), self.result.next_token]

    def covers(self, pos: int) -> bool:
        return self.base <= pos <= self.end


class FrontierDecoder:
    """Frontier steps without drafts as one Decode stream on one replica: a
    step per token, each read as a :class:`Verification` of no drafts. Its
    tokens are the target's own at the committed positions (the decision
    rule), so it never goes stale; it is stopped when it is of no more use."""

    def __init__(self, gen: Generation, replica: int) -> None:
        self.gen = gen
        self.replica = replica
        self.next_pos = len(gen.committed)  # the position its next message decides
        self.token_at = 0.0  # clock time its last message came
        #: Its stream sent its last token (the last position, or a stop token): its replica stopped. Before
        #: that, over gRPC, the replica runs the next step as soon as it sent a token, so closing the
        #: stream cancels a step there.
        self.at_end = False
        self._steps = gen.decode(replica)

    def read(self, lease: Lease) -> asyncio.Task[VerifyResult]:
        """The next step's result, on ``lease`` (within its replica's deadline)."""
        self.next_pos += 1
        return asyncio.ensure_future(self.gen.on_replica(lease, self.next_pos, self._next()))

    async def _next(self) -> VerifyResult:
        try:
            result = await anext(self._steps)
            self.token_at = clock()
            self.at_end = self.next_pos > self.gen.last_pos or result.next_token in self.gen.engine.eos
            return result
        except StopAsyncIteration:
            name = self.gen.engine.targets.name(self.replica)
            raise Unavailable(f"{name} is unavailable: its decode stream ended early") from None

    def close(self, reader: asyncio.Task | None) -> None:
        """Stop the stream (and its pending ``reader``)."""
        self.gen.close_stream(self._steps, reader)


async def run_dsi(gen: Generation) -> AsyncIterator[None]:
    run = DsiRun(gen)
    try:
        while not gen.finished:
            await run.step()
            yield None
    finally:
        run.cancel_all()


class DsiRun:
    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.engine = gen.engine
        self.verifs: list[Verification] = []
        self.feeds = [DraftFeed(gen, slot) for slot in gen.drafter_slots()]
        self._seq = itertools.count()
        self._done = itertools.count()
        #: The frontier's Decode stream, while it runs (between steps: in none of the verifications).
        self.decoder: FrontierDecoder | None = None
        self._plain_step = -1  # the base of the last frontier step issued without drafts (a Verify)
        gen.on_diverge = self._diverge

    def start_work(self) -> None:
        """Issue the verifications and draft streams that can go now."""
        self.dispatch()
        for feed in self.feeds:
            feed.ensure()

    async def step(self) -> None:
        """Dispatch what can go, wait for the next event, act on it, and
        dispatch what that made possible before the tokens it committed
        travel on to the client (the frontier step after a rejection and the
        new draft stream must not wait for that)."""
        self.start_work()
        waits: set[asyncio.Future] = {v.task for v in self.verifs if v.result is None}
        waits.update(feed.reader for feed in self.feeds if feed.reader is not None)
        if not waits:
            raise Internal("DSI has nothing in flight (bug)")
        loop = asyncio.get_running_loop()
        read_by = min((feed.read_by for feed in self.feeds if feed.reader is not None), default=None)
        timeout = None if read_by is None else max(0.0, read_by - loop.time())
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for v in sorted((v for v in self.verifs if v.task in done), key=lambda v: v.seq):
            self._completed(v)
        for feed in self.feeds:
            if feed.reader is not None and feed.reader in done:
                feed.on_chunk()
            else:
                feed.check_deadline()
        self.resolve()
        for feed in self.feeds:
            feed.stop_if_stale()
        if not self.gen.finished:
            self.start_work()

    # --- scheduling -----------------------------------------------------------

    def _covered(self, pos: int) -> bool:
        return any(v.covers(pos) for v in self.verifs)

    def _first_undrafted(self, pos: int) -> int:
        """The first position from ``pos`` on where no live verification
        carries a draft. A chunk starts there, so that it begins where the
        previous one's drafts end (its bonus position), as the drafter's
        chunks do."""
        while True:
            ends = [v.end for v in self.verifs if v.base <= pos < v.end]
            if not ends:
                return pos
            pos = max(ends)

    def _next_base(self, pos: int) -> int:
        """The base of the first live verification after ``pos`` (past the
        last position if none)."""
        return min((v.base for v in self.verifs if v.base > pos), default=self.gen.last_pos + 1)

    def _drafts_for(self, start: int) -> tuple[list[DraftToken], bool]:
        """Pending drafts for a verification at ``start``: up to the next
        verification's base, past the last position or the services' limit.
        Also whether that is all it can ever get (no reason to wait)."""
        gen = self.gen
        c = len(gen.committed)
        stop = min(self._next_base(start), gen.last_pos + 1, start + self.engine.max_draft_tokens)
        drafts = gen.pending[start - c : stop - c]
        return drafts, start + len(drafts) >= stop or not more_drafts_coming(gen)

    def _guessed(self, pos: int) -> bool:
        """Whether a drafter guessed the token at ``pos`` (the main path, or
        another drafter's proposal): a verification there may decide more."""
        c = len(self.gen.committed)
        return pos - c < len(self.gen.pending) or any(p.guess_at(pos) is not None for p in self.gen.proposals.values())

    def dispatch(self) -> None:
        gen, pool = self.gen, self.engine.targets
        c = len(gen.committed)
        if gen.finished or c > gen.last_pos:
            return
        if not self._covered(c):  # a frontier step, now (unless the decoder's step behind it gets there)
            guessed = self._guessed(c)
            if guessed or self._decoding() is None:
                lease, _ = pool.acquire_frontier(gen.affinity(c))
                if guessed or self._plain_step != c - 1:
                    self._issue(c, self._drafts_for(c)[0], lease, frontier=True)
                    self._plain_step = -1 if guessed else c
                else:  # the second frontier step in a row with nothing drafted to verify: decode
                    self._stop_decoder()
                    self.decoder = FrontierDecoder(gen, lease.replica)
                    self._decode_step(lease)
        else:
            self._hedge(c)
        while len(self.verifs) < gen.sp_degree:
            start = self._first_undrafted(c)
            if start > gen.last_pos or start - c > len(gen.pending):
                return  # everything is covered, or the drafts it would assume are not there yet
            if start > c and gen.pending[start - c - 1].token_id in self.engine.eos:
                return  # nothing follows a drafted end-of-sequence
            drafts, complete = self._drafts_for(start)
            if not drafts or (len(drafts) < gen.lookahead and not complete):
                return
            holder: list[Verification] = []
            lease = pool.acquire_idle(
                depth=lambda s=start: s - len(gen.committed),
                preempt=lambda h=holder: self._preempted(h[0]),
                affinity=gen.affinity(start),
            )
            if lease is None:
                return
            holder.append(self._issue(start, drafts, lease))

    def _hedge(self, c: int) -> None:
        """A frontier step without drafts beside the verifications that cover
        the frontier ``c``, on the idle replica that would answer soonest,
        where that pays (:meth:`_beside_pays`)."""
        cached = self.gen.affinity(c)
        found = self.engine.targets.soonest_idle(lambda i: max(1, c - cached(i)))
        if found is not None and self._beside_pays(c, found[1]):
            self._issue(c, [], self.engine.targets.acquire_on(found[0]), frontier=True)

    def _beside_pays(self, c: int, end: float) -> bool:
        """Whether a frontier step of no drafts that would answer at ``end``
        (clock) pays beside the verifications that cover ``c``: when the
        draft at ``c`` is wrong (as recent drafts were, ``1 - a``), it decides
        ``c`` sooner than they would (a long chunk on a target that computes
        every draft: 16 drafts on a 30 ms pass with 3 ms each decided the
        frontier 48 ms after a step would have; or a slower replica), against
        the time its replica is kept from chunks while the text goes on as
        drafted (``a``). The covering verifications go on (they may decide
        more); whichever answers first decides."""
        pool = self.engine.targets
        than = min((pool.expected_end(v.lease) for v in self.verifs if v.covers(c) and v.result is None), default=0.0)
        a = self.gen.recent_acceptance
        return (1 - a) * (than - end) > max(a, HEDGE_MARGIN) * (end - clock())

    def _issue(self, base: int, main: list[DraftToken], lease: Lease, frontier: bool = False) -> Verification:
        gen = self.gen
        tree, n_main = verification_tree(
            main, gen.alternatives, base, self.engine.max_draft_tokens, list(gen.proposals.values()), gen.context(base)
        )
        v = Verification(next(self._seq), base, tree, n_main, lease)
        v.info = self.gen.verification_info(lease.replica, base, len(tree), frontier)
        v.task = asyncio.ensure_future(self.gen.verify(lease, base, v.drafts))
        self.verifs.append(v)
        self.gen.stats.verifications_started += 1
        return v

    def _decode_step(self, lease: Lease) -> None:
        """Read the decoder's next step (over gRPC its replica runs it already, but the first)."""
        gen, decoder = self.gen, self.decoder
        assert decoder is not None
        v = Verification(next(self._seq), decoder.next_pos, [], 0, lease, decoder=decoder)
        v.info = gen.verification_info(lease.replica, v.base, 0, frontier=True)
        v.task = decoder.read(lease)
        self.verifs.append(v)
        gen.stats.verifications_started += 1

    def _decoding(self) -> Verification | None:
        """The decoder's step that runs now, if any."""
        decoder = self.decoder
        return next((v for v in self.verifs if decoder and v.decoder is decoder and v.result is None), None)

    def _decode_on(self) -> None:
        """After the commits of an event. When a step of the decoder has
        completed, its next one goes on while it would decide the frontier
        alone: nothing else covers the frontier and no draft waits there
        (else its replica is free for those). A step running one position
        behind (another verification decided that position first, the same
        way) goes on: it is the way to the frontier; one further behind is
        cancelled."""
        decoder, gen = self.decoder, self.gen
        if decoder is None:
            return
        c = len(gen.committed)
        for done in [v for v in self.verifs if v.decoder is decoder and v.result is not None]:
            self.verifs.remove(done)  # decided by another verification first
            self._ended(done, Outcome.USELESS)
            if done.tokens()[0] != gen.committed[done.base]:  # a target's rounding: it assumes otherwise
                decoder.next_pos = -1
        step = self._decoding()
        if step is not None:
            if step.base < c - 1 or gen.finished:
                self._drop(step, Outcome.USELESS)
                gen.stats.verifications_cancelled += not decoder.at_end  # a step its replica runs is cancelled
            return
        pool = self.engine.targets
        if self._covered(c):  # beside late verifications, its next step (running already) may pay
            alone = self._beside_pays(c, decoder.token_at + pool.pass_seconds(decoder.replica, 1))
        else:
            alone = not self._guessed(c)
        if not gen.finished and decoder.next_pos == c and alone and pool.is_active(decoder.replica):
            self._decode_step(pool.acquire_on(decoder.replica))
            return
        self._stop_decoder()
        if not decoder.at_end:  # over gRPC, a Decode stream's replica runs the next step once it sent a token
            pool.busy_since(decoder.replica, decoder.token_at)
            gen.stats.verifications_started += 1
            gen.stats.verifications_cancelled += 1
            info = gen.verification_info(decoder.replica, decoder.next_pos, 0, frontier=True)
            if info is not None and gen.observer is not None:
                gen.observer.verification_ended(info, Outcome.USELESS, info.started)

    def _stop_decoder(self) -> None:
        """Stop the decoder's stream (between its steps)."""
        if self.decoder is not None:
            self.decoder.close(None)
            self.decoder = None

    def _drop(self, v: Verification, outcome: Outcome) -> bool:
        """Remove ``v``, cancelling it if it still runs; True if it did."""
        self.verifs.remove(v)
        self.engine.targets.release(v.lease, cancelled=not v.task.done())
        self._ended(v, outcome)
        if v.decoder is not None and v.decoder is self.decoder:
            self.decoder = None
            v.decoder.close(v.task)  # cancels the stream, and the step its replica runs
            return True
        return self.gen.cancel(v.task)

    def _ended(self, v: Verification, outcome: Outcome) -> None:
        if v.info is not None and self.gen.observer is not None:
            self.gen.observer.verification_ended(v.info, outcome, time.perf_counter())

    def _preempted(self, victim: Verification) -> None:
        """The pool took ``victim``'s replica for another generation's frontier
        step. Its span is covered again later (a chunk or a frontier step)."""
        if victim in self.verifs and self._drop(victim, Outcome.PREEMPTED):
            self.gen.stats.preemptions += 1

    def _diverge(self) -> None:
        """The committed token differs from the draft: everything speculated
        past it is stale. Cancel it and restart drafting."""
        c = len(self.gen.committed)
        for v in list(self.verifs):
            if v.decoder is not None and v.base >= c - 1:
                continue  # it assumes only committed tokens (and decodes on from them)
            if self._drop(v, Outcome.STALE):
                self.gen.stats.verifications_cancelled += 1
        for feed in self.feeds:
            feed.stop()

    def cancel_all(self) -> None:
        """At the generation's end: what still runs is useless once it has
        finished (every position decided), abandoned when it was cut short
        (its client gone, an error)."""
        finished = self.gen.finished
        for v in list(self.verifs):
            if self._drop(v, Outcome.USELESS if finished else Outcome.ABANDONED) and finished:
                self.gen.stats.verifications_cancelled += 1
        self._stop_decoder()
        for feed in self.feeds:
            feed.stop()

    # --- deciding ---------------------------------------------------------------

    def _completed(self, v: Verification) -> None:
        if v.task.cancelled():
            return
        exc = v.task.exception()
        if exc is not None:
            self._ended(v, Outcome.FAILED)
            v.info = None  # told once
            if v.decoder is not None and v.decoder is self.decoder:
                self._stop_decoder()
            if not self.gen.retry_after(exc):
                raise exc
            self.verifs.remove(v)  # its span is uncovered: dispatch() issues it again elsewhere
            return
        v.result = v.task.result()
        v.done_order = next(self._done)
        self.gen.stats.target_forward_passes += 1
        if v.info is not None and self.gen.observer is not None:
            self.gen.observer.verification_completed(v.info, time.perf_counter(), v.result.num_accepted)

    def resolve(self) -> None:
        """Commit what completed verifications decide, from the frontier on."""
        gen = self.gen
        while not gen.finished:
            c = len(gen.committed)
            done = [v for v in self.verifs if v.covers(c) and v.result is not None]
            if not done:
                break
            v = min(done, key=lambda v: v.done_order)
            self.verifs.remove(v)
            self._ended(v, Outcome.DECIDED)
            # Every token it decided is committed: the positions before ``c``
            # agree with the committed ones (its assumptions held), and after
            # a divergence its own path is what was committed.
            for token in v.tokens()[c - v.base :]:
                gen.commit(token)
                if gen.finished:
                    break
            # Verifications whose every position is decided are useless now.
            c = len(gen.committed)
            for w in [w for w in self.verifs if w.end < c and w.decoder is None]:
                if self._drop(w, Outcome.USELESS):
                    gen.stats.verifications_cancelled += 1
        self._decode_on()
