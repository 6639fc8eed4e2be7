"""Batched forward passes of the Hugging Face backend (issue 17): sessions
with different cached lengths and numbers of new tokens in one pass give the
rows and caches they would get alone; greedy generations on batching targets
equal ``generate(do_sample=False)``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dsi.backends import BatchLimits, LocalDrafter, LocalTarget  # noqa: E402
from dsi.backends.batching import BatchItem  # noqa: E402
from dsi.backends.hf import HFDrafter, HFTarget  # noqa: E402
from dsi.domain.types import DraftRequest, DraftToken, VerifyRequest  # noqa: E402
from services.coordinator.engine import Engine, GenerationParams, Strategy  # noqa: E402

FAMILIES = ["llama", "gpt2"]
VOCAB = 64
ATOL = 1e-4


@pytest.fixture(scope="module")
def references(tiny_models: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(str(tiny_models[f])).float().eval() for f in FAMILIES}


def full_logits(model: Any, tokens: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()


def _seq(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_pass_equals_each_sequence_alone(family: str, tiny_models: dict[str, Path], references) -> None:
    core = HFTarget(str(tiny_models[family])).core
    ref = references[family]
    # (cached prefix already in the session, full sequence now, rows wanted)
    cases = [(0, 5, 1), (7, 12, 4), (20, 21, 1), (3, 30, 6), (11, 11 + 2, 2), (0, 1, 1)]
    states, items = [], []
    for n, (cached, total, rows) in enumerate(cases):
        seq = _seq(n, total)
        state = core.new_state()
        if cached:
            core.forward_sync(state, seq[:cached], 1)
        states.append(state)
        items.append(BatchItem(state, seq, rows))
    alone = core.forward_sync
    core.forward_sync = None  # type: ignore[assignment]  # the batched path must not fall back to it
    out = core.forward_batch_sync(items)
    core.forward_sync = alone  # type: ignore[method-assign]
    for item, fwd, (cached, total, rows) in zip(items, out, cases, strict=True):
        want = full_logits(ref, list(item.tokens))[total - rows :]
        assert fwd.rows.shape == want.shape
        np.testing.assert_allclose(fwd.rows, want, atol=ATOL)
        assert (fwd.rows.argmax(-1) == want.argmax(-1)).all()
        reused = min(cached, total - rows)
        assert (fwd.cached_tokens, fwd.computed_tokens) == (reused, total - reused)
    # each session's cache now holds exactly its own sequence: a next token alone is right
    for n, item in enumerate(items):
        assert item.state.cache.get_seq_length() == len(item.tokens)
        nxt = [*item.tokens, (7 * n) % VOCAB]
        fwd = core.forward_sync(item.state, nxt, 1)
        assert fwd.computed_tokens == 1
        np.testing.assert_allclose(fwd.rows[0], full_logits(ref, nxt)[-1], atol=ATOL)
    # and batched again after that, with rollbacks (shorter sequences) mixed in
    again = [BatchItem(s, [*i.tokens[: max(1, len(i.tokens) - 3)], 5], 1) for s, i in zip(states, items, strict=True)]
    for item, fwd in zip(again, core.forward_batch_sync(again), strict=True):
        np.testing.assert_allclose(fwd.rows[0], full_logits(ref, list(item.tokens))[-1], atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
async def test_local_target_batches_verifications_of_different_sessions(family: str, tiny_models) -> None:
    model = HFTarget(str(tiny_models[family]))
    reqs = []
    for i in range(6):
        ctx = _seq(40 + i, 3 + 4 * i)
        drafts = [DraftToken(t) for t in _seq(90 + i, i % 4)]
        reqs.append(VerifyRequest(f"s{i}", ctx, drafts))
    alone = LocalTarget(model)
    expected = [await alone.verify(r) for r in reqs]
    batched = LocalTarget(HFTarget(str(tiny_models[family])), batch=BatchLimits(max_batch=4))
    got = await asyncio.gather(*(batched.verify(r) for r in reqs))
    for a, b in zip(expected, got, strict=True):
        assert (a.decisions, a.num_accepted, a.next_token) == (b.decisions, b.num_accepted, b.next_token)
    info = await batched.info()
    assert info.counters.batched_requests >= 4
    assert info.counters.device_passes < len(reqs)


@pytest.mark.parametrize("family", FAMILIES)
async def test_hf_drafter_steps_batch(family: str, tiny_models) -> None:
    async def stream(drafter: LocalDrafter, i: int) -> list[int]:
        req = DraftRequest(f"d{i}", _seq(60 + i, 2 + 3 * i), lookahead=2, max_tokens=6)
        return [t.token_id async for chunk in drafter.draft(req) for t in chunk.tokens]

    path = str(tiny_models[f"{family}-drafter"])
    alone = LocalDrafter(HFDrafter(path))
    expected = [await stream(alone, i) for i in range(4)]
    batched = LocalDrafter(HFDrafter(path), batch=BatchLimits(max_batch=4))
    got = await asyncio.gather(*(stream(batched, i) for i in range(4)))
    assert list(got) == expected
    assert batched.device.stats.batched_requests > 0


@pytest.mark.parametrize("family", FAMILIES)
async def test_greedy_generations_on_batching_replicas_equal_generate(family: str, tiny_models, references) -> None:
    """Concurrent generations of every strategy on two batching replicas and a
    batching drafter, joining at different times, one cancelled mid-way."""
    limits = BatchLimits(max_batch=8)
    targets = [LocalTarget(HFTarget(str(tiny_models[family])), batch=limits) for _ in range(2)]
    drafter = LocalDrafter(HFDrafter(str(tiny_models[f"{family}-drafter"])), batch=limits)
    info = targets[0].model.info
    engine = Engine(
        targets, [drafter], eos_token_ids=(), max_context=info.max_context_tokens, vocab_size=info.vocab_size
    )
    ref = references[family]
    n_new = 12

    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.002 * i)
        prompt = _seq(200 + i, 2 + i % 5)
        strategy = list(Strategy)[i % 3]
        gen = engine.generate(prompt, GenerationParams(n_new, strategy=strategy, lookahead=1 + i % 4))
        out = [t async for toks in gen.tokens() for t in toks]
        with torch.inference_mode():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        assert out == want[0, len(prompt) :].tolist(), f"generation {i} ({strategy.value}) diverged"
        return out

    tasks = [asyncio.ensure_future(one(i)) for i in range(9)]
    await asyncio.sleep(0.01)
    tasks[4].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for i, r in enumerate(results) if i != 4 and isinstance(r, BaseException)]
    assert not failures, failures
    assert sum(t.device.stats.batched_requests for t in targets) > 0
