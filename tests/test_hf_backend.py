"""The Hugging Face backend (dsi/backends/hf.py) on the tiny random models of
the ``tiny_models`` fixture: greedy verification against the model's own
forward pass, KV-cache reuse against recomputation, drafting against
``generate``, and loading."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dsi.backends import load_drafter_model, load_target_model  # noqa: E402
from dsi.backends.base import LocalDrafter, LocalTarget  # noqa: E402
from dsi.backends.hf import HFDrafter, HFTarget  # noqa: E402
from dsi.domain import sampling  # noqa: E402
from dsi.domain.errors import InvalidArgument, NotFound  # noqa: E402
from dsi.domain.types import GREEDY, DraftRequest, DraftToken, SamplingParams, VerifyRequest  # noqa: E402
from dsi.wire.convert import model_info_from_pb, model_info_to_pb  # noqa: E402

FAMILIES = ["llama", "gpt2"]
VOCAB = 64
ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_targets(tiny_models: dict[str, Path]) -> dict[str, HFTarget]:
    return {name: HFTarget(str(tiny_models[name])) for name in FAMILIES}


@pytest.fixture(scope="module")
def reference_models(tiny_models: dict[str, Path]) -> dict[str, Any]:
    """The same models loaded independently, the plain transformers way."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name in (*FAMILIES, "llama-drafter", "gpt2-drafter"):
        out[name] = AutoModelForCausalLM.from_pretrained(str(tiny_models[name])).float().eval()
    return out


def full_logits(model: Any, tokens: list[int]) -> np.ndarray:
    """Logits of every position, computed from scratch."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def _context(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).tolist()


# ---------------------------------------------------------------------------
# Greedy verification
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_greedy_verify_equals_argmax_of_full_forward(
    family: str, hf_targets: dict[str, HFTarget], reference_models: dict[str, Any]
) -> None:
    target = LocalTarget(hf_targets[family])
    ref = reference_models[family]
    kinds = {"none": 0, "random": 0, "good-then-bad": 0, "all-good": 0}
    for case in range(8):
        ctx = _context(100 + case, 3 + 2 * case)
        kind = list(kinds)[case % 4]
        if kind == "none":
            draft_ids: list[int] = []
        elif kind == "random":
            draft_ids = _context(200 + case, 4)
        else:
            # The model's own greedy continuation, so that drafts get accepted.
            cont: list[int] = []
            for _ in range(5):
                cont.append(int(full_logits(ref, ctx + cont)[-1].argmax()))
            draft_ids = cont[:4]
            if kind == "good-then-bad":
                draft_ids[2] = (draft_ids[2] + 1) % VOCAB
        kinds[kind] += 1
        drafts = [DraftToken(t) for t in draft_ids]
        res = await target.verify(VerifyRequest(f"s{case % 2}", ctx, drafts, GREEDY))
        logits = full_logits(ref, ctx + draft_ids)
        best = [int(logits[len(ctx) - 1 + i].argmax()) for i in range(len(draft_ids) + 1)]
        assert [d.token_id for d in res.decisions] == best[: len(draft_ids)], f"{family} case {case}: decisions"
        assert [d.accepted for d in res.decisions] == [b == t for b, t in zip(best[:-1], draft_ids, strict=True)]
        run = next((i for i, (b, t) in enumerate(zip(best[:-1], draft_ids, strict=True)) if b != t), len(draft_ids))
        assert res.num_accepted == run, f"{family} case {case}: num_accepted"
        assert res.next_token == best[run], f"{family} case {case}: correction or bonus token"
        if kind == "all-good":
            assert res.num_accepted == 4, "the model's own greedy drafts are all accepted"
        if kind == "good-then-bad":
            assert res.num_accepted == 2
    assert all(kinds.values())


@pytest.mark.parametrize("family", FAMILIES)
async def test_sampling_verify_uses_the_model_logits(
    family: str, hf_targets: dict[str, HFTarget], reference_models: dict[str, Any]
) -> None:
    """Sampled decisions equal verify_rows applied to independently computed logits."""
    target = LocalTarget(hf_targets[family])
    params = SamplingParams(temperature=0.9, top_k=20)
    rng = np.random.default_rng(3)
    for seed in range(6):
        ctx = _context(300 + seed, 6)
        drafts = []
        for i in range(3):  # guesses from random logits: some right, most wrong
            q = rng.normal(size=VOCAB)
            drafts.append(DraftToken(sampling.choose(q, params, seed, len(ctx) + i)))
        res = await target.verify(VerifyRequest("s", ctx, drafts, params, seed))
        rows = full_logits(reference_models[family], ctx + [d.token_id for d in drafts])[len(ctx) - 1 :]
        decisions, path, nxt = sampling.verify_rows(rows, drafts, params, seed, len(ctx))
        assert (res.decisions, res.path, res.next_token) == (decisions, path, nxt), f"seed {seed}"
        assert res.num_accepted == len(path) and path == list(range(len(path))), "a chain's path is its prefix"


# ---------------------------------------------------------------------------
# KV-cache reuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_kv_cache_reuse_equals_recomputation(
    family: str, hf_targets: dict[str, HFTarget], reference_models: dict[str, Any]
) -> None:
    model = hf_targets[family]
    ref = reference_models[family]
    state = model.new_state()
    base = _context(7, 12)
    alt = [*base[:5], 60, 61, 62, 63]
    # (tokens, rows, expected (cached, computed))
    steps: list[tuple[list[int], int, tuple[int, int]]] = [
        (base, 1, (0, 12)),  # cold start
        ([*base, 1, 2], 1, (12, 2)),  # extension: only the 2 new tokens
        ([*base, 1, 2, 3], 3, (12, 3)),  # extension verified with 3 rows
        ([*base, 1, 2, 3], 1, (14, 1)),  # the same context again: recompute only the last token
        (base[:7], 1, (6, 1)),  # rollback to a shorter context
        ([*base[:7], 40, 41], 2, (7, 2)),  # changed suffix
        (alt, 1, (5, 4)),  # another continuation of a shared prefix
        ([*base, 9], 1, (5, 8)),  # back to the first continuation
        ([*alt, 5], 2, (5, 5)),  # and back again
        ([7, *base], 1, (0, 13)),  # no common prefix at all: a fresh start
        ([7, *base, 8, 8, 8, 8], 5, (12, 5)),  # rows reaching into the cached part
    ]
    prev: list[int] = []
    for i, (tokens, rows, expected) in enumerate(steps):
        fwd = await model.forward(state, tokens, rows)
        want = full_logits(ref, tokens)[-rows:]
        assert fwd.rows.shape == (rows, VOCAB), f"step {i}: shape {fwd.rows.shape}"
        err = float(np.abs(fwd.rows - want).max())
        assert np.allclose(fwd.rows, want, atol=ATOL, rtol=1e-5), f"{family} step {i}: max |diff| {err}"
        lcp = next(
            (j for j, (a, b) in enumerate(zip(prev, tokens, strict=False)) if a != b), min(len(prev), len(tokens))
        )
        keep = min(lcp, len(tokens) - rows)
        assert (fwd.cached_tokens, fwd.computed_tokens) == (keep, len(tokens) - keep), (
            f"{family} step {i}: cached/computed {fwd.cached_tokens}/{fwd.computed_tokens}, expected "
            f"{keep}/{len(tokens) - keep} (common prefix {lcp}, {rows} rows)"
        )
        assert (fwd.cached_tokens, fwd.computed_tokens) == expected, f"{family} step {i}"
        assert state.tokens == tokens
        assert state.cache.get_seq_length() == len(tokens), f"step {i}: the cache must hold exactly the tokens"
        prev = tokens


@pytest.mark.parametrize("family", FAMILIES)
async def test_verify_stats_reflect_cache_reuse(family: str, hf_targets: dict[str, HFTarget]) -> None:
    target = LocalTarget(hf_targets[family])
    ctx = _context(9, 10)
    first = await target.verify(VerifyRequest("sess", ctx))
    assert (first.stats.cached_tokens, first.stats.computed_tokens) == (0, 10)
    second = await target.verify(VerifyRequest("sess", [*ctx, first.next_token], [DraftToken(3), DraftToken(4)]))
    assert (second.stats.cached_tokens, second.stats.computed_tokens) == (10, 3), "only the new token and drafts"
    other = await target.verify(VerifyRequest("other", ctx))
    assert other.stats.cached_tokens == 0, "sessions do not share caches"
    rollback = await target.verify(VerifyRequest("sess", ctx[:6]))
    assert (rollback.stats.cached_tokens, rollback.stats.computed_tokens) == (5, 1)
    assert first.stats.compute_seconds > 0 and first.stats.queue_seconds >= 0
    info = await target.info()
    assert info.counters.computed_tokens == 10 + 3 + 10 + 1 and info.counters.cached_tokens == 15
    assert info.counters.forward_passes == 4 and info.counters.sessions == 2


async def test_a_failed_forward_leaves_the_session_consistent(
    tiny_models: dict[str, Path], reference_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = HFTarget(str(tiny_models["llama"]))
    state = model.new_state()
    base = _context(21, 10)
    await model.forward(state, base, 1)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated out of memory")

    with monkeypatch.context() as m:
        m.setattr(model.core.model, "forward", boom)
        with pytest.raises(RuntimeError, match="simulated"):
            await model.forward(state, [*base[:6], 1, 2, 3], 1)
    tokens = [*base, 5]
    fwd = await model.forward(state, tokens, 1)
    want = full_logits(reference_models["llama"], tokens)[-1:]
    assert np.allclose(fwd.rows, want, atol=ATOL), f"max |diff| {float(np.abs(fwd.rows - want).max())}"


# ---------------------------------------------------------------------------
# Drafting
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_drafters(tiny_models: dict[str, Path]) -> dict[str, HFDrafter]:
    return {name: HFDrafter(str(tiny_models[f"{name}-drafter"])) for name in FAMILIES}


def generate_greedy(model: Any, ctx: list[int], n: int) -> list[int]:
    ids = torch.tensor([ctx], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ctx) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
async def test_greedy_draft_equals_generate(
    family: str, hf_drafters: dict[str, HFDrafter], reference_models: dict[str, Any]
) -> None:
    drafter = LocalDrafter(hf_drafters[family])
    for case, (n_ctx, lookahead, max_tokens) in enumerate([(5, 3, 7), (9, 1, 4), (3, 8, 8)]):
        ctx = _context(400 + case, n_ctx)
        chunks = [c async for c in drafter.draft(DraftRequest(f"d{case}", ctx, lookahead, max_tokens))]
        sizes = [len(c.tokens) for c in chunks]
        want_sizes = [lookahead] * (max_tokens // lookahead) + (
            [max_tokens % lookahead] if max_tokens % lookahead else []
        )
        assert sizes == want_sizes, f"chunks of at most lookahead={lookahead}: {sizes}"
        starts = [c.start_position for c in chunks]
        assert starts == [n_ctx + sum(sizes[:i]) for i in range(len(sizes))], "start positions follow the tokens"
        tokens = [t.token_id for c in chunks for t in c.tokens]
        want = generate_greedy(reference_models[f"{family}-drafter"], ctx, max_tokens)
        assert tokens == want, f"{family} case {case}: drafted {tokens}, generate() gives {want}"
    info = await drafter.info()
    assert info.counters.drafted_tokens == 7 + 4 + 8 and info.counters.requests == 3


@pytest.mark.parametrize("family", FAMILIES)
async def test_draft_stream_stops_at_the_context_limit(family: str, hf_drafters: dict[str, HFDrafter]) -> None:
    drafter = LocalDrafter(hf_drafters[family])
    max_context = hf_drafters[family].info.max_context_tokens
    ctx = _context(500, max_context - 5)
    chunks = [c async for c in drafter.draft(DraftRequest("full", ctx, lookahead=2, max_tokens=0))]
    assert sum(len(c.tokens) for c in chunks) == 5, "max_tokens=0 drafts until the context is full"
    with pytest.raises(InvalidArgument):
        async for _ in drafter.draft(DraftRequest("full", _context(501, max_context), lookahead=2)):
            pass


async def test_closing_a_draft_stream_stops_drafting(hf_drafters: dict[str, HFDrafter]) -> None:
    drafter = LocalDrafter(hf_drafters["llama"])
    stream = drafter.draft(DraftRequest("c", _context(600, 4), lookahead=2, max_tokens=0))
    first = await stream.__anext__()
    assert len(first.tokens) == 2
    await stream.aclose()
    info = await drafter.info()
    assert info.counters.drafted_tokens == 2, "no drafting after the consumer stopped"
    assert info.counters.cancelled_requests == 1 and drafter.active_streams == 0
    assert not drafter.sessions.is_busy("c")


async def test_sampled_drafts_apply_the_decision_rule_to_the_drafter_logits(
    hf_drafters: dict[str, HFDrafter], reference_models: dict[str, Any]
) -> None:
    """A sampled draft is the drafter's guess of the target's token: the same
    keyed rule (seed, position) applied to the drafter's warped distribution."""
    drafter = LocalDrafter(hf_drafters["gpt2"])
    params = SamplingParams(temperature=0.8, top_k=10)
    for seed in (9, 10, 11):
        ctx = _context(700 + seed, 6)
        chunks = [c async for c in drafter.draft(DraftRequest(f"s{seed}", ctx, 3, 6, params, seed=seed))]
        seq = list(ctx)
        for t in (t for c in chunks for t in c.tokens):
            logits = full_logits(reference_models["gpt2-drafter"], seq)[-1]
            assert t.token_id == sampling.choose(logits, params, seed, len(seq)), f"seed {seed} position {len(seq)}"
            assert sampling.warp(logits, params)[t.token_id] > 0, "never a token the warping excludes"
            seq.append(t.token_id)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def test_missing_directory_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFound, match="no-such-model"):
        HFTarget(str(missing))
    with pytest.raises(NotFound, match="no-such-model"):
        load_drafter_model(str(missing))


def test_directory_without_config_is_not_found(tmp_path: Path) -> None:
    empty = tmp_path / "empty-model-dir"
    empty.mkdir()
    (empty / "README.md").write_text("not a model")
    with pytest.raises(NotFound, match="empty-model-dir") as exc:
        load_target_model(str(empty))
    assert "config.json" in str(exc.value)


def test_bad_dtype_is_invalid_argument(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        HFTarget(str(tiny_models["gpt2"]), dtype="int8")


def test_model_info(
    tiny_models: dict[str, Path], hf_targets: dict[str, HFTarget], hf_drafters: dict[str, HFDrafter]
) -> None:
    infos = {
        "llama": hf_targets["llama"].info,
        "gpt2": hf_targets["gpt2"].info,
        "llama-drafter": hf_drafters["llama"].info,
        "gpt2-drafter": hf_drafters["gpt2"].info,
    }
    for name, info in infos.items():
        assert info.vocab_size == VOCAB, name
        assert info.max_context_tokens == 256, name
        assert info.num_parameters > 0, name
        assert info.backend == "hf" and info.device == "cpu" and info.dtype == "float32", name
        assert info.model_id == name, "the model id is the directory name"
        assert info.eos_token_ids == (), f"{name}: the tiny configs have no eos"
        assert info.host == socket.gethostname(), "the host, so that a coordinator sees who shares a device"
        assert model_info_from_pb(model_info_to_pb(info)) == info, "every field crosses the wire"
    assert infos["llama"].num_parameters > infos["llama-drafter"].num_parameters
    assert infos["llama"].num_parameters == sum(p.numel() for p in hf_targets["llama"].core.model.parameters())
    fp = {name: info.tokenizer_fingerprint for name, info in infos.items()}
    assert fp["llama"] == fp["llama-drafter"], "same tokenizer, same fingerprint"
    assert fp["llama"] != fp["gpt2"], "no tokenizer vs a real one must differ"
    assert fp["gpt2"] == fp["gpt2-drafter"], "without a tokenizer the fingerprint stands for the vocabulary size"
    assert fp["gpt2"] == hashlib.sha256(f"no-tokenizer-vocab:{VOCAB}".encode()).hexdigest()[:32]
    assert hf_targets["llama"].core.tokenizer is not None and hf_targets["gpt2"].core.tokenizer is None
