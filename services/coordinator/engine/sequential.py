"""Non-SI and SI: one verification at a time, on one replica.

- non-SI: Verify with zero drafts, one token per forward pass.
- SI: draft ``lookahead`` tokens, verify them in one forward pass, commit the
  accepted ones and the target's token after them, repeat.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from dsi.domain.types import DraftToken
from services.coordinator.engine.generation import Generation


def _replica(gen: Generation, current: int | None) -> int:
    """Stay on one replica (its cache) unless it is drained."""
    pool = gen.engine.targets
    return current if current is not None and pool.is_active(current) else pool.least_loaded()


async def _verify(gen: Generation, replica: int, drafts: list[DraftToken]):
    result = await gen.verify(gen.engine.targets.acquire_on(replica), len(gen.committed), drafts)
    gen.stats.verifications_started += 1
    gen.stats.target_forward_passes += 1
    return result


async def run_nonsi(gen: Generation) -> AsyncIterator[None]:
    replica = None
    while not gen.finished:
        replica = _replica(gen, replica)
        result = await _verify(gen, replica, [])
        gen.commit(result.next_token)
        yield None


async def _draft(gen: Generation, k: int) -> list[DraftToken]:
    gen.stats.draft_streams += 1
    stream = gen.drafter().draft(gen.draft_request(list(gen.committed), k))
    drafts: list[DraftToken] = []
    try:
        async for chunk in stream:
            drafts.extend(chunk.tokens)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    gen.stats.drafted_tokens += len(drafts)
    return drafts


async def run_si(gen: Generation) -> AsyncIterator[None]:
    replica = None
    while not gen.finished:
        replica = _replica(gen, replica)
        k = min(gen.params.lookahead, gen.last_pos - len(gen.committed))
        drafts = await _draft(gen, k) if k > 0 else []
        result = await _verify(gen, replica, drafts)
        gen.pending = list(drafts)
        for d in drafts[: result.num_accepted]:
            if gen.finished:
                break
            gen.commit(d.token_id)
        if not gen.finished:
            gen.commit(result.next_token)
        gen.pending = []
        yield None
