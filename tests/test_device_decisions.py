"""Decisions on the model's device (dsi/backends/torch_sampling.py) against
the host's numpy math (dsi/domain/sampling.py): the same keyed uniforms bit
for bit, the same tokens on random logits for every warping, the same tree
decisions, and a Hugging Face target that moves only token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dsi.backends import torch_sampling  # noqa: E402
from dsi.backends.base import LocalDrafter, LocalTarget  # noqa: E402
from dsi.backends.hf import HFDrafter, HFTarget  # noqa: E402
from dsi.domain import sampling  # noqa: E402
from dsi.domain.types import ROOT, DraftRequest, DraftToken, SamplingParams, VerifyRequest  # noqa: E402

CPU = torch.device("cpu")
PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.95),
    SamplingParams(temperature=2.0, top_p=0.3),
]


@pytest.mark.parametrize(
    "seed, position",
    [(0, 0), (1, 1), (12345, 678), (2**64 - 1, 2**40 + 3), (2**63 + 17, 5), (987654321, 2**31 - 1)],
)
def test_uniforms_are_bit_identical_to_numpy(seed: int, position: int) -> None:
    vocab = 70_000
    want = sampling.keyed_uniforms(seed, position, np.arange(vocab))
    got = torch_sampling.keyed_uniforms(seed, [position], vocab, CPU)[0].numpy()
    assert got.dtype == np.float64
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64)), "every bit of every uniform"
    noise = torch_sampling.gumbel_noise(seed, [position], vocab, CPU)[0].numpy()
    ref = sampling.gumbel_noise(seed, position, vocab)
    assert np.max(np.abs(noise - ref)) < 1e-12


def test_several_positions_in_one_batch_match_one_at_a_time() -> None:
    positions = [3, 4, 9, 4]
    got = torch_sampling.keyed_uniforms(77, positions, 1000, CPU).numpy()
    for row, p in zip(got, positions, strict=True):
        assert np.array_equal(row, sampling.keyed_uniforms(77, p, np.arange(1000)))


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_choices_equal_numpy_on_random_logits(params: SamplingParams, dtype: str) -> None:
    rng = np.random.default_rng(hash((str(params), dtype)) % 2**32)
    vocab, n = 3000, 40
    logits = torch.tensor(rng.normal(0, 3, size=(n, vocab)), dtype=getattr(torch, dtype))
    if dtype == "bfloat16":  # many exact ties: the lowest id must win, as on the host
        logits[:, 100] = logits[:, 2000] = logits.max() + 1
    positions = rng.integers(0, 10_000, size=n).tolist()
    seed = int(rng.integers(0, 2**63))
    got = torch_sampling.choose_rows(logits, params, seed, positions).tolist()
    host = logits.float().numpy()
    want = [sampling.choose(host[i], params, seed, positions[i]) for i in range(n)]
    assert got == want
    if params.greedy and dtype == "bfloat16":
        assert set(got) == {100}


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_candidates_equal_numpy(params: SamplingParams, k: int) -> None:
    rng = np.random.default_rng(k)
    for trial in range(10):
        row = torch.tensor(rng.normal(0, 2, size=500), dtype=torch.bfloat16)  # ties are common
        row[7] = row[300] = row[11] = row.max()
        got = torch_sampling.top_candidates(row, params, 99, trial, k)
        want = sampling.top_candidates(row.float().numpy(), params, 99, trial, k)
        assert got == want, f"trial {trial}"


def _random_tree(rng: np.random.Generator, n: int, vocab: int) -> list[DraftToken]:
    drafts: list[DraftToken] = []
    for i in range(n):
        parent = ROOT if i == 0 or rng.random() < 0.2 else int(rng.integers(-1, i))
        drafts.append(DraftToken(int(rng.integers(0, vocab)), parent))
    return drafts


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_tree_and_chain_decisions_equal_the_host_path(params: SamplingParams) -> None:
    rng = np.random.default_rng(5)
    vocab = 50
    for trial in range(30):
        n = int(rng.integers(0, 9))
        logits = torch.tensor(rng.normal(0, 2, size=(n + 1, vocab)), dtype=torch.float32)
        if trial % 2:
            drafts = _random_tree(rng, n, vocab)
        else:  # a chain that mostly follows the target, so paths get long
            drafts = [DraftToken(int(logits[i].argmax()) if rng.random() < 0.8 else 3) for i in range(n)]
        start = int(rng.integers(1, 500))
        moved: list[int] = []
        got = torch_sampling.verify_scores(logits, drafts, params, 42, start, moved)
        want = sampling.verify_rows(logits.numpy(), drafts, params, 42, start)
        assert got == want, f"trial {trial}"
        assert moved == [8 * (n + 1)], "only one int64 id per row reaches the host"


async def test_hf_target_decides_on_device_and_moves_only_ids(tiny_models: dict[str, Path]) -> None:
    on = HFTarget(str(tiny_models["llama"]), decide_on_device=True)
    off = HFTarget(str(tiny_models["llama"]), decide_on_device=False)
    assert on.decides_on_device and not off.decides_on_device
    assert not HFTarget(str(tiny_models["llama"])).decides_on_device, "on the CPU the host decides by default"
    vocab = on.info.vocab_size
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, vocab, size=5 + i).tolist(), [DraftToken(int(t)) for t in rng.integers(0, vocab, size=i)])
        for i in range(6)
    ]
    tree = [DraftToken(3, ROOT), DraftToken(5, ROOT), DraftToken(9, 0), DraftToken(1, 1)]
    cases.append(([4, 8, 15, 16], tree))
    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_k=10)):
        results = []
        for model in (on, off):
            target = LocalTarget(model)
            out = []
            for i, (ctx, drafts) in enumerate(cases):
                r = await target.verify(VerifyRequest(f"s{i}", ctx, drafts, params, seed=i))
                out.append((r.decisions, r.path, r.next_token))
            results.append(out)
        assert results[0] == results[1]
    rows = 2 * sum(len(drafts) + 1 for _, drafts in cases)
    assert on.decisions.host_bytes == 8 * rows, "8 bytes per row: the chosen id"
    assert off.decisions.host_bytes == 4 * vocab * rows, "the host path reads whole float32 rows"


async def test_hf_drafter_guesses_on_device_like_the_host(tiny_models: dict[str, Path]) -> None:
    on = LocalDrafter(HFDrafter(str(tiny_models["llama-drafter"]), decide_on_device=True))
    off = LocalDrafter(HFDrafter(str(tiny_models["llama-drafter"]), decide_on_device=False))
    for params in (SamplingParams(), SamplingParams(temperature=0.8)):
        streams = []
        for drafter in (on, off):
            req = DraftRequest("d", [1, 2, 3, 4], lookahead=3, sampling=params, seed=7, max_tokens=9)
            streams.append([[t.token_id for t in c.tokens] async for c in drafter.draft(req)])
        assert streams[0] == streams[1] and sum(map(len, streams[0])) == 9
