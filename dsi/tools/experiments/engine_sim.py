"""Simulation by the engine itself: dsi's real engine, in-process, over
synthetic targets and drafters whose latencies are ``asyncio.sleep`` calls on
a virtual clock (:mod:`dsi.tools.experiments.virtual_time`).

Where :mod:`dsi.tools.experiments.simulate` re-implements the engine's rules
event by event (fast enough for large grids, chains only), this runs the rules
themselves, so it models every engine feature, token trees included, at the
cost of the engine's own CPU time per event. Network delay is a sleep before
and after each call. Results are :class:`~dsi.tools.experiments.simulate.Run`
records like the other simulator's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from dsi.backends import LocalDrafter, LocalTarget
from dsi.backends.synthetic import SyntheticDrafter, SyntheticTarget
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.types import DraftChunk, DraftRequest, ServiceInfo, TreeShape, VerifyRequest, VerifyResult
from dsi.tools.experiments.simulate import Node, Run, SimConfig
from dsi.tools.experiments.virtual_time import run_virtual

VOCAB = 32000


def _spec(node: Node, seed: int, **extra: float) -> str:
    keys = {
        "vocab": VOCAB,
        "seed": seed,
        "ttft_ms": node.ttft_ms,
        "tpot_ms": node.tpot_ms,
        "verify_token_ms": node.verify_token_ms,
        "prefill_token_ms": node.prefill_token_ms,
        **extra,
    }
    return "synthetic:" + ",".join(f"{k}={v}" for k, v in keys.items())


class _DelayedTarget(Target):
    def __init__(self, inner: LocalTarget, delay_ms: float) -> None:
        self.inner, self.delay, self.name = inner, delay_ms / 1000, inner.name

    async def info(self) -> ServiceInfo:
        return await self.inner.info()

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        await asyncio.sleep(self.delay)
        result = await self.inner.verify(request)
        await asyncio.sleep(self.delay)
        return result

    async def release_session(self, session_id: str) -> bool:
        return await self.inner.release_session(session_id)


class _DelayedDrafter(Drafter):
    def __init__(self, inner: LocalDrafter, delay_ms: float) -> None:
        self.inner, self.delay, self.name = inner, delay_ms / 1000, inner.name

    async def info(self) -> ServiceInfo:
        return await self.inner.info()

    async def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        await asyncio.sleep(self.delay)
        async for chunk in self.inner.draft(request):
            await asyncio.sleep(self.delay)
            yield chunk

    async def release_session(self, session_id: str) -> bool:
        return await self.inner.release_session(session_id)


def simulate_engine(
    cfg: SimConfig,
    strategies: Sequence[str],
    repeats: int,
    seed: int,
    tree: TreeShape,
    sibling_acceptance: float = 0.4,
    outputs: list[tuple[str, list[int], list[int]]] | None = None,
) -> dict[str, list[Run]]:
    """``repeats`` generations per strategy (prompts drawn from ``seed``; the
    same prompts for every strategy), each on fresh instances. ``outputs``
    gets (strategy, prompt, output) of each generation, in order."""
    from services.coordinator.engine import Engine, GenerationParams, Strategy

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, size=cfg.prompt_len).tolist() for _ in range(repeats)]
    drafter_keys: dict[str, Any] = {"acceptance": cfg.acceptance, "sibling_acceptance": sibling_acceptance}

    async def one(strategy: str, prompt: list[int]) -> Run:
        targets = [
            _DelayedTarget(LocalTarget(SyntheticTarget(_spec(node, seed))), node.delay_ms) for node in cfg.targets
        ]
        drafter = _DelayedDrafter(
            LocalDrafter(SyntheticDrafter(_spec(cfg.drafter, seed, **drafter_keys))), cfg.drafter.delay_ms
        )
        engine = Engine(
            targets,
            [drafter],
            max_context=8192,
            vocab_size=VOCAB,
            max_sp_degree=cfg.max_sp_degree,
            max_draft_tokens=cfg.max_draft_tokens,
            lead_chunks=cfg.lead_chunks,
        )
        params = GenerationParams(cfg.tokens, strategy=Strategy(strategy), lookahead=cfg.lookahead, tree=tree)
        loop = asyncio.get_running_loop()
        start = loop.time()
        gen = engine.generate(prompt, params)
        last = start
        output: list[int] = []
        async for chunk in gen.tokens():
            last = loop.time()
            output += chunk
        if outputs is not None:
            outputs.append((strategy, prompt, output))
        st = gen.stats
        return Run(
            latency_ms=(last - start) * 1000,
            target_forwards=st.verifications_started,
            completed_forwards=st.target_forward_passes,
            cancelled=st.verifications_cancelled,
            drafted=st.drafted_tokens,
            decided_drafts=st.decided_drafts,
            accepted=st.accepted_tokens,
            draft_streams=st.draft_streams,
        )

    async def all_runs() -> dict[str, list[Run]]:
        return {s: [await one(s, p) for p in prompts] for s in strategies}

    return run_virtual(all_runs())
