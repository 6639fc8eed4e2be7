"""Non-SI and SI: one verification at a time, on one replica.

- non-SI: one token per forward pass, decoded by the target itself (the
  Decode RPC: one message per token; Verify calls without drafts with a
  target that does not serve it).
- SI: draft ``lookahead`` tokens (a chain, or a token tree with that many
  main-path positions), verify them in one forward pass, commit the accepted
  path and the target's token after it, repeat.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from dsi.domain.errors import Unavailable
from dsi.domain.types import DraftToken, VerifyResult
from services.coordinator.engine.drafters import DrafterSlot, Proposal
from services.coordinator.engine.generation import Generation, within
from services.coordinator.engine.observe import DraftChunkInfo, Outcome
from services.coordinator.engine.trees import StreamTree, verification_tree
from services.coordinator.pool import Lease, clock

T = TypeVar("T")


def _replica(gen: Generation, current: int | None) -> int:
    """Stay on one replica (its cache) unless it is drained or down."""
    pool = gen.engine.targets
    return current if current is not None and pool.is_active(current) else pool.least_loaded()


async def _step(gen: Generation, replica: int, drafts: int, call: Callable[[Lease], Awaitable[T]]) -> T:
    """One frontier step on ``replica`` (``call`` with its lease, over the
    committed sequence and ``drafts`` drafts), told to the observer."""
    lease = gen.engine.targets.acquire_on(replica)
    info = gen.verification_info(lease.replica, len(gen.committed), drafts, frontier=True)
    gen.stats.verifications_started += 1
    outcome = Outcome.ABANDONED
    try:
        result = await call(lease)
        outcome = Outcome.DECIDED
    except Exception:
        outcome = Outcome.FAILED
        raise
    finally:
        if info is not None and gen.observer is not None:
            now = time.perf_counter()
            if outcome is Outcome.DECIDED:
                gen.observer.verification_completed(info, now, getattr(result, "num_accepted", 0))
            gen.observer.verification_ended(info, outcome, now)
    gen.stats.target_forward_passes += 1
    return result


async def _verify(gen: Generation, replica: int | None, drafts: list[DraftToken]) -> tuple[VerifyResult, int]:
    """Verify ``drafts`` at the frontier on ``replica`` (or, when it fails,
    on another one: :meth:`Generation.retry_after`); returns the result and
    the replica that gave it."""
    c = len(gen.committed)
    while True:
        replica = _replica(gen, replica)
        try:
            return await _step(gen, replica, len(drafts), lambda lease: gen.verify(lease, c, drafts)), replica
        except Exception as exc:
            if not gen.retry_after(exc):
                raise


def _next_on(gen: Generation, steps: AsyncIterator[VerifyResult]) -> Callable[[Lease], Awaitable[VerifyResult | None]]:
    """A :func:`_step` call: the next of ``steps`` (None after the last)."""

    async def next_step() -> VerifyResult | None:
        try:
            return await anext(steps)
        except StopAsyncIteration:
            return None

    return lambda lease: gen.on_replica(lease, len(gen.committed), next_step())


async def run_nonsi(gen: Generation) -> AsyncIterator[None]:
    """One target step per token, decoded by the target itself (a Decode
    stream: one message per token) on one replica; started again from the
    committed tokens on another replica when it fails or is drained."""
    pool = gen.engine.targets
    replica = None
    while not gen.finished:
        replica = _replica(gen, replica)
        steps = gen.decode(replica)
        next_token = _next_on(gen, steps)
        try:
            while not gen.finished and pool.is_active(replica):
                result = await _step(gen, replica, 0, next_token)
                if result is None:
                    raise Unavailable(f"{pool.name(replica)} is unavailable: its decode stream ended early")
                gen.commit(result.next_token)
                yield None
        except Exception as exc:
            if not gen.retry_after(exc):
                raise
        finally:
            await steps.aclose()  # type: ignore[attr-defined]


async def _draft(gen: Generation, slot: DrafterSlot, k: int) -> list[DraftToken]:
    """Up to ``k`` main-path drafts (and alternatives) from ``slot``'s
    drafter; what came before it failed, if it does."""
    gen.stats.draft_streams += 1
    drafter = slot.client
    assert drafter is not None
    stream = drafter.draft(gen.draft_request(list(gen.committed), k, primary=slot.primary))
    sid, obs = gen.next_stream_id(), gen.observer
    if obs is not None:
        obs.draft_stream_started(sid, drafter.name, len(gen.committed), time.perf_counter())
    drafts: list[DraftToken] = []
    finished = False
    since = clock()  # the call, then the last chunk
    timed: list[tuple[int, float, float]] = []  # (drafts, seconds since, the drafter's computing) of each chunk
    try:
        while True:
            timeout = gen.draft_timeout()
            try:
                chunk = await within(timeout, stream.__anext__())
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise Unavailable(f"{drafter.name} is unavailable: no draft chunk within {timeout:.3g}s") from None
            drafts.extend(chunk.tokens)
            now = clock()
            timed.append((len(chunk.tokens), now - since, chunk.stats.compute_seconds))
            since = now
            if obs is not None:
                obs.draft_chunk(DraftChunkInfo(sid, chunk.start_position, len(chunk.tokens), time.perf_counter()))
        finished = True
    except Exception as exc:
        gen.drafter_failed(slot, exc)  # raises what is not a drafter's failure
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        if obs is not None:
            obs.draft_stream_ended(sid, time.perf_counter(), cancelled=not finished)
    gen.stats.drafted_tokens += len(drafts)
    if finished and slot.primary and gen.planner is not None:
        for i, (tokens, seconds, computing) in enumerate(timed):  # the first chunk includes the stream's start
            gen.planner.drafted(tokens, seconds, i == 0, computing)
    return drafts


async def _round_drafts(gen: Generation, replica: int | None) -> tuple[list[DrafterSlot], list[list[DraftToken]]]:
    """One SI round's drafts: ``lookahead`` from each drafter in service, and the drafters."""
    c = len(gen.committed)
    # Under load (a batching replica's batch filling up) the lookahead shrinks, down to one draft.
    headroom = gen.engine.targets.headroom(replica) if replica is not None else 1.0
    k = min(max(1, round(gen.lookahead * headroom)), gen.last_pos - c)
    slots = [s for s in gen.drafter_slots() if not s.stats.dropped and gen.reattach(s)]
    if k <= 0:
        return slots, [[] for _ in slots]
    if len(slots) == 1:  # no task to gather
        return slots, [await _draft(gen, slots[0], k)]
    return slots, list(await asyncio.gather(*(_draft(gen, s, k) for s in slots)))


async def run_si(gen: Generation) -> AsyncIterator[None]:
    replica = None
    # The next round's drafts are asked for before this round's tokens travel on to the client, so
    # that passing them on (text, the stream's write) is not on the critical path.
    drafting: asyncio.Task[tuple[list[DrafterSlot], list[list[DraftToken]]]] | None = None
    try:
        while not gen.finished:
            c = len(gen.committed)
            slots, streams = await (drafting if drafting is not None else _round_drafts(gen, replica))
            drafting = None
            main: list[DraftToken] = []
            for slot, nodes in zip(slots, streams, strict=True):
                proposal = None if slot.primary else gen.proposals.setdefault(slot.index, Proposal(slot, c))
                for position, token, branch in StreamTree(c).read(nodes):
                    if proposal is not None:
                        if branch is None:
                            proposal.tokens.append(token)
                    elif branch is None:
                        main.append(DraftToken(token))
                    elif len(branch) == 1:  # a new alternative (its branch grows in place)
                        gen.alternatives.add(position, branch)
            tree, _ = verification_tree(
                main, gen.alternatives, c, gen.engine.max_draft_tokens, list(gen.proposals.values()), gen.committed
            )
            result, replica = await _verify(gen, replica, tree)
            gen.pending = main
            for token in [*(tree[i].token_id for i in result.path), result.next_token]:
                if gen.finished:
                    break
                gen.commit(token)
            gen.pending = []
            gen.alternatives.clear()
            gen.proposals.clear()
            if not gen.finished:
                drafting = asyncio.ensure_future(_round_drafts(gen, replica))
            yield None
    finally:
        if drafting is not None:  # the generation ended after a round (a stop string, the client went)
            drafting.cancel()
            await asyncio.gather(drafting, return_exceptions=True)
