"""Sampled output has exactly the target's distribution under every strategy,
whatever the drafts say and whenever they arrive.

The first tokens of thousands of short generations (a different seed each)
are compared with the exactly computed distribution of the target alone, by a
chi-square test at the 0.1% level, on prompts where end-of-sequence is likely
(a drafted EOS used to end a drafter chunk early and so change which rule
decided the position) and on prompts where an ordinary token is. Drafters run
faster and slower than the target, lookahead 1-8, 1-4 replicas, sequential and
concurrent generations.

Latencies are real ``asyncio.sleep`` calls on a virtual clock
(dsi/tools/experiments/virtual_time.py): the schedule is what those latencies give, but the
waiting is skipped, so a run of 1,500 generations takes seconds. Outputs are a
function of the seed alone (the decision rule), so these tests are
deterministic: they always pass or always fail.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.backends.base import DrafterModel, Forward, TargetModel
from dsi.backends.synthetic import PseudoLM
from dsi.domain.sampling import warp
from dsi.domain.types import SamplingParams
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy
from tests.helpers import make_engine
from tests.stats import assert_fits, exact_continuations

# The pair of issue 12: p(EOS = 9 | 1, 2, 3) = 0.367 at temperature 1.
VOCAB, SEED, SUPPORT, EOS = 16, 0, 4, 9
EOS_PROMPT = [1, 2, 3]
ORDINARY_PROMPT = [0, 10, 5]  # token 6 has p = 0.51 and EOS is not in the support
T1 = SamplingParams(temperature=1.0)


def target_spec(tpot_ms: float, **extra: float) -> str:
    keys = ",".join(f"{k}={v}" for k, v in extra.items())
    return f"synthetic:vocab={VOCAB},seed={SEED},support={SUPPORT},eos={EOS},ttft_ms={tpot_ms},tpot_ms={tpot_ms}" + (
        f",{keys}" if keys else ""
    )


def drafter_spec(tpot_ms: float, acceptance: float, jitter_ms: float = 0) -> str:
    return target_spec(tpot_ms, acceptance=acceptance, jitter_ms=jitter_ms)


def exact_synthetic(prompt: list[int], n: int, sampling: SamplingParams) -> dict[tuple[int, ...], float]:
    lm = PseudoLM(VOCAB, SEED, SUPPORT)
    return exact_continuations(lambda seq: warp(lm.logits(seq), sampling), prompt, n, eos={EOS})


async def sample_many(
    engine: Engine,
    prompt: list[int],
    params_for_seed: Callable[[int], GenerationParams],
    trials: int,
    concurrency: int = 1,
    seed_base: int = 0,
) -> Counter:
    counts: Counter = Counter()
    seeds = iter(range(seed_base, seed_base + trials))

    async def worker() -> None:
        for seed in seeds:
            gen = engine.generate(prompt, params_for_seed(seed))
            out: list[int] = []
            async for toks in gen.tokens():
                out.extend(toks)
            counts[tuple(out)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


# --- the case of the issue: P(first token = EOS) --------------------------------------


def test_dsi_first_token_is_eos_as_often_as_the_target_says():
    """Target 20 ms per pass, drafter 10 ms per token with acceptance 0.9,
    lookahead 3, 2 replicas: DSI used to give EOS first 54% of the time where
    the target gives it 36.7%."""
    lm = PseudoLM(VOCAB, SEED, SUPPORT)
    p_eos = float(warp(lm.logits(EOS_PROMPT), T1)[EOS])
    assert abs(p_eos - 0.367) < 0.001
    engine = make_engine(target_spec(20), drafter_spec(10, 0.9), 2)
    n = 2000
    counts = run_virtual(
        sample_many(
            engine, EOS_PROMPT, lambda s: GenerationParams(3, T1, seed=s, strategy=Strategy.DSI, lookahead=3), n
        )
    )
    eos_first = sum(c for out, c in counts.items() if out[0] == EOS)
    se = math.sqrt(p_eos * (1 - p_eos) / n)
    assert abs(eos_first / n - p_eos) < 3 * se, (
        f"P(EOS first) = {eos_first / n:.3f}, target {p_eos:.3f} +- {3 * se:.3f}"
    )


# --- every strategy, fast and slow drafters, lookahead 1-8, 1-4 replicas --------------------


@dataclass(frozen=True)
class Case:
    strategy: Strategy
    target_ms: float
    drafter_ms: float
    acceptance: float
    lookahead: int
    replicas: int
    concurrency: int = 1
    sampling: SamplingParams = T1
    drafter_jitter_ms: float = 0

    @property
    def id(self) -> str:
        s = f"{self.strategy.value}-t{self.target_ms:g}-d{self.drafter_ms:g}-a{self.acceptance:g}"
        s += f"-k{self.lookahead}-r{self.replicas}"
        if self.drafter_jitter_ms:
            s += f"-j{self.drafter_jitter_ms:g}"
        if self.concurrency > 1:
            s += f"-c{self.concurrency}"
        if self.sampling != T1:
            s += "-warped"
        return s


WARPED = SamplingParams(temperature=0.7, top_k=3, top_p=0.9)
CASES = [
    Case(Strategy.NONSI, 20, 0, 0.9, 1, 1),
    Case(Strategy.SI, 20, 2, 0.9, 3, 1),
    Case(Strategy.SI, 20, 30, 0.5, 8, 2),
    Case(Strategy.DSI, 20, 10, 0.9, 3, 2),  # the pair
    Case(Strategy.DSI, 20, 2, 0.9, 1, 2),  # fast drafter, shortest lookahead
    Case(Strategy.DSI, 20, 4, 0.9, 4, 2, drafter_jitter_ms=6),  # chunks end just before or after a target pass
    Case(Strategy.DSI, 20, 7, 0.6, 3, 3, drafter_jitter_ms=2),
    Case(Strategy.DSI, 20, 2, 0.5, 5, 1),  # a single replica: frontier steps preempt chunks of its own generation
    Case(Strategy.DSI, 20, 2, 0.9, 8, 4),
    Case(Strategy.DSI, 20, 40, 0.9, 2, 4),  # drafter slower than the target
    Case(Strategy.DSI, 20, 4, 0.7, 3, 3, concurrency=6),  # generations compete for replicas: preemptions
    Case(Strategy.DSI, 20, 2, 0.9, 4, 2, sampling=WARPED),
]


@pytest.mark.parametrize("prompt", [EOS_PROMPT, ORDINARY_PROMPT], ids=["eos-likely", "ordinary-likely"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_first_tokens_follow_the_target_distribution(case: Case, prompt: list[int]):
    # A verification costs more with more drafts (1 ms each), as on real hardware.
    t_spec = target_spec(case.target_ms, verify_token_ms=1)
    d_spec = drafter_spec(case.drafter_ms, case.acceptance, case.drafter_jitter_ms)
    engine = make_engine(t_spec, d_spec, case.replicas)
    n = 1500
    params = lambda s: GenerationParams(  # noqa: E731
        2, case.sampling, seed=s, strategy=case.strategy, lookahead=case.lookahead
    )
    counts = run_virtual(sample_many(engine, prompt, params, n, case.concurrency, seed_base=10_000))
    assert_fits(counts, exact_synthetic(prompt, 2, case.sampling), f"{case.id}, prompt {prompt}")
    for slot in engine.targets.slots:  # nothing leaked, whatever the schedule
        assert not slot.leases and len(slot.member.sessions) == 0


@pytest.mark.parametrize("strategy", list(Strategy))
def test_whole_continuations_follow_the_target_distribution(strategy: Strategy):
    """Whole 3-token continuations (no EOS) of 50 concurrent generations at a
    time on 3 replicas, acceptance 0.5, temperature 0.8 and top-k 3, random
    latencies: against the exact joint distribution."""
    t_spec = "synthetic:vocab=12,seed=3,support=3,tpot_ms=0.3,jitter_ms=0.6"
    d_spec = "synthetic:vocab=12,seed=3,support=3,tpot_ms=0.1,jitter_ms=0.2,acceptance=0.5"
    sampling = SamplingParams(temperature=0.8, top_k=3)
    lm = PseudoLM(12, 3, 3)
    exact = exact_continuations(lambda seq: warp(lm.logits(seq), sampling), [1, 2], 3)
    engine = make_engine(t_spec, d_spec, 3)
    params = lambda s: GenerationParams(3, sampling, seed=s, strategy=strategy, lookahead=2)  # noqa: E731
    counts = run_virtual(sample_many(engine, [1, 2], params, 3000, concurrency=50))
    assert_fits(counts, exact, f"{strategy.value}: 3-token continuations")


# --- tiny Hugging Face models -------------------------------------------------------------------


class SlowTarget(TargetModel):
    """A target model whose every forward pass takes ``ms`` longer (a slower device)."""

    def __init__(self, inner: TargetModel, ms: float) -> None:
        self.inner, self.ms, self.info = inner, ms, inner.info

    def new_state(self) -> Any:
        return self.inner.new_state()

    async def forward(self, state: Any, tokens: Sequence[int], num_rows: int) -> Forward:
        await asyncio.sleep(self.ms / 1000)
        return await self.inner.forward(state, tokens, num_rows)

    async def forward_tree(
        self, state: Any, context: Sequence[int], tokens: Sequence[int], parents: Sequence[int]
    ) -> Forward:
        await asyncio.sleep(self.ms / 1000)
        return await self.inner.forward_tree(state, context, tokens, parents)

    async def keep_path(
        self, state: Any, context: Sequence[int], path_tokens: Sequence[int], path: Sequence[int]
    ) -> None:
        await self.inner.keep_path(state, context, path_tokens, path)


class SlowDrafter(DrafterModel):
    """A drafter model whose every token step takes ``ms`` longer."""

    def __init__(self, inner: DrafterModel, ms: float) -> None:
        self.inner, self.ms, self.info = inner, ms, inner.info

    def new_state(self) -> Any:
        return self.inner.new_state()

    async def next_scores(
        self, state: Any, tokens: Sequence[int], params: SamplingParams, seed: int
    ) -> tuple[np.ndarray, Forward]:
        await asyncio.sleep(self.ms / 1000)
        return await self.inner.next_scores(state, tokens, params, seed)

    async def next_candidates(
        self, state: Any, tokens: Sequence[int], params: SamplingParams, seed: int, k: int
    ) -> tuple[list[int], Forward]:
        await asyncio.sleep(self.ms / 1000)
        return await self.inner.next_candidates(state, tokens, params, seed, k)


@pytest.fixture(scope="module")
def neox_with_likely_eos(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[int], int]:
    """A tiny random GPT-NeoX target and drafter whose EOS id is the target's
    most likely first token after the prompt (as likely as possible)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("neox")
    prompt = [3, 14, 15]
    models = {}
    for name, size, seed in (("target", 32, 0), ("drafter", 16, 1)):
        torch.manual_seed(seed)
        cfg = GPTNeoXConfig(
            vocab_size=24,
            hidden_size=size,
            intermediate_size=2 * size,
            num_hidden_layers=2 if name == "target" else 1,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        models[name] = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the target's first distribution so EOS is clearly likely
        models["target"].get_output_embeddings().weight.mul_(12.0)
        logits = models["target"](torch.tensor([prompt])).logits[0, -1]
    eos = int(torch.argmax(logits))
    for name, model in models.items():
        model.config.eos_token_id = eos
        model.generation_config.eos_token_id = eos
        model.save_pretrained(root / name)
    return str(root / "target"), str(root / "drafter"), prompt, eos


@pytest.mark.parametrize(
    ("strategy", "drafter", "target_ms", "drafter_ms", "lookahead", "n"),
    [
        (Strategy.DSI, "target", 20, 8, 3, 1000),  # a drafter that drafts EOS as often as the target samples it
        (Strategy.DSI, "small", 40, 6, 8, 600),
        (Strategy.SI, "target", 20, 10, 3, 600),
    ],
)
def test_hf_first_tokens_follow_the_target_distribution(
    neox_with_likely_eos, strategy, drafter, target_ms, drafter_ms, lookahead, n
):
    from transformers import AutoModelForCausalLM

    t_path, d_path, prompt, eos = neox_with_likely_eos
    sampling = SamplingParams(temperature=1.0, top_k=5)
    model = AutoModelForCausalLM.from_pretrained(t_path).eval()

    def next_probs(seq: list[int]) -> np.ndarray:
        with torch.no_grad():
            return warp(model(torch.tensor([seq])).logits[0, -1].double().numpy(), sampling)

    exact = exact_continuations(next_probs, prompt, 3, eos={eos})
    assert exact[(eos,)] > 0.3, "test setup: EOS should be a likely first token"
    targets = [LocalTarget(SlowTarget(load_target_model(t_path), target_ms)) for _ in range(2)]
    d_model = load_drafter_model(t_path if drafter == "target" else d_path)
    engine_drafter = LocalDrafter(SlowDrafter(d_model, drafter_ms))
    engine = Engine(targets, [engine_drafter], eos_token_ids=(eos,), max_context=64, vocab_size=24)
    params = lambda s: GenerationParams(3, sampling, seed=s, strategy=strategy, lookahead=lookahead)  # noqa: E731
    counts = run_virtual(sample_many(engine, prompt, params, n))
    what = f"HF {strategy.value}, {drafter} drafter {drafter_ms} ms, target {target_ms} ms, lookahead {lookahead}"
    assert_fits(counts, exact, what)
