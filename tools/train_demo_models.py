#!/usr/bin/env python3
"""Train the demo model pair that ``dsi up`` serves: a small Python-code target
and a drafter distilled from it, on the Python standard library's own source.

Everything runs on the CPU from files every Python installation has, with a
fixed seed; nothing is downloaded. The pipeline:

1. corpus     the stdlib's ``.py`` files (tests and generated tables excluded),
              split by file into train / held-out by a hash of the relative path;
2. tokenizer  byte-level BPE (``tokenizers``), saved for ``AutoTokenizer``;
3. target     ``LlamaForCausalLM`` (~5.5M parameters) trained by next-token loss;
4. drafter    ``LlamaForCausalLM`` (~0.9M parameters, 6x fewer) trained by
              distillation: KL(target || drafter) on the target's logits;
5. evaluation held-out perplexity of both, and the acceptance rate of the pair
              through dsi's own engine (greedy and sampled) on held-out prompts;
6. output     ``<out>/<target>/``, ``<out>/<drafter>/`` (config.json, 16-bit
              safetensors, tokenizer, generation_config.json, README.md model
              card) and ``<out>/eval.json`` (prompts and measured figures, read
              by tests/test_demo_models.py).

The shipped pair was trained on a 2-core AMD EPYC VM shared with other work,
with wall-time budgets (the schedule follows the time spent, so a rerun is close
but not bit-identical), in five stages (about 2.5 hours; docs/models.md lists the
exact commands, ``eval.json`` records each): the target 55 min and its drafter;
the drafter distilled further (``--distill-more``); the target trained on from
its weights with extra packages (``--target-more --extra-packages suggested``),
then 8 min with unlikelihood (``--unlikelihood``, against greedy loops); the
drafter distilled against the new target twice. The first stage::

    nice -n 19 .venv/bin/python tools/train_demo_models.py --out models --threads 1 \
        --target-minutes 55 --drafter-minutes 12

Without the time budgets the plan's step counts apply (seeded and repeatable).

``--quick`` runs the whole pipeline on toy sizes in a minute or two (a smoke
test of the script, not a usable model).

The stdlib differs slightly between Python versions, so the exact numbers (and
weights) depend on the Python that runs this; the cards record which one did.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import tokenize
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

EOS = "<|endoftext|>"
TARGET_NAME = "pycoder-5m"
DRAFTER_NAME = "pycoder-2m-drafter"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
# Generated data rather than code: the pydoc topics blob and the charmap codec tables.
EXCLUDED_FILES = {"pydoc_data/topics.py"}
HELDOUT_MODULUS = 20  # one file in 20 (by path hash) is held out


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class Plan:
    vocab: int = 4096
    seq_len: int = 512
    # Small batches: with a few million tokens to spend, more updates per token
    # win (equal-token trials: batch 1-2 x 512 beat 8 x 512 clearly, for both models).
    target_batch: int = 1
    drafter_batch: int = 1
    eval_batch: int = 8
    # Narrower than the first pair's 384 x 6 (11M): on a shared 2-core CPU it trains about 1.6x as many
    # tokens per hour, which beat width at this budget (held-out perplexity 46.6 after 55 min vs 78.7).
    target: ModelShape = ModelShape(hidden=256, layers=6, intermediate=704, heads=4, kv_heads=2)
    drafter: ModelShape = ModelShape(hidden=128, layers=2, intermediate=384, heads=4, kv_heads=2)
    target_steps: int = 8800  # 4.5M tokens, 1.7 epochs of the train split (what 55 min gave the shipped pair)
    target_lr: float = 1.5e-3
    drafter_steps: int = 4000  # 2.05M tokens
    drafter_lr: float = 2e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    num_prompts: int = 32  # held-out prompts for the acceptance figures
    new_tokens: int = 64
    sampled_seeds: int = 2
    temperature: float = 1.0
    lookahead: int = 5
    test_prompts: int = 6  # the subset tests/test_demo_models.py re-measures
    test_new_tokens: int = 48
    checkpoint_minutes: float = 5.0  # how often a partial model is saved to <out>/checkpoints/


QUICK = Plan(
    vocab=512,
    seq_len=256,
    eval_batch=4,
    target=ModelShape(hidden=64, layers=2, intermediate=128, heads=2, kv_heads=1),
    drafter=ModelShape(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1),
    target_steps=30,
    drafter_steps=20,
    num_prompts=6,
    new_tokens=16,
    sampled_seeds=1,
    test_prompts=3,
    test_new_tokens=12,
)


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub

        class _Bar:
            def __init__(self) -> None:
                self.n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                if self.n % max(1, total // 20) == 0 or self.n == total:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def set_postfix_str(self, s: str) -> None: ...

            def close(self) -> None: ...

        return _Bar()
    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    root: str
    train: list[tuple[str, str]]  # (relative path, text)
    heldout: list[tuple[str, str]]
    packages: list[dict] = field(default_factory=list)  # extra sources (tools/package_sources.py), train only

    def describe(self) -> dict:
        def size(files: list[tuple[str, str]]) -> int:
            return sum(len(t.encode()) for _, t in files)

        listing = "\n".join(rel for rel, _ in self.train + self.heldout)
        return {
            "stdlib": self.root,
            "python": platform.python_version(),
            "train_files": len(self.train),
            "train_bytes": size(self.train),
            "heldout_files": len(self.heldout),
            "heldout_bytes": size(self.heldout),
            "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16],
            **({"packages": self.packages} if self.packages else {}),
        }


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def read_source(path: Path) -> str | None:
    """A source file's text with normalised newlines, or None when it is
    unreadable, empty or generated (the ``gencodec.py`` charmap tables)."""
    try:
        with tokenize.open(path) as fh:  # honours PEP 263 coding cookies
            text = fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    if "gencodec.py" in text[:1000] or not text.strip():
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_corpus(extra_packages: list[str] | None = None) -> Corpus:
    """The stdlib, split by file; plus the train-split files of ``extra_packages``
    (permissive licences only, checked by tools/package_sources.py)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if EXCLUDED_DIRS & set(parts[:-1]) or parts[-1].startswith("test_") or rel in EXCLUDED_FILES:
            continue
        text = read_source(path)
        if text is not None:
            (heldout if is_heldout(rel) else train).append((rel, text))
    corpus = Corpus(str(root), train, heldout)
    if extra_packages:
        from tools.package_sources import package

        for name in extra_packages:
            pkg = package(name)  # LookupError: missing, or not a permissive licence
            files = [(pkg.rel(p), read_source(p)) for p in pkg.files]
            used = [(rel, text) for rel, text in files if text is not None and not is_heldout(rel)]
            train.extend(used)
            corpus.packages.append(
                {
                    "name": pkg.name,
                    "version": pkg.version,
                    "licence": pkg.licence,
                    "train_files": len(used),
                    "train_bytes": sum(len(t.encode()) for _, t in used),
                }
            )
    return corpus


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus, plan: Plan, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=plan.vocab,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for _, t in corpus.train), trainer, length=len(corpus.train))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,  # code: never touch the spaces
        model_max_length=plan.seq_len,
    )
    hf.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    sample = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    assert loaded.decode(loaded.encode(sample)) == sample, "tokenizer does not round-trip"
    assert loaded.eos_token_id == 0
    return tok


def encode(tok, files: list[tuple[str, str]]) -> np.ndarray:
    """Files as one token stream, each followed by the end-of-text token."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for enc in tok.encode_batch([t for _, t in files]):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.uint16)


def token_byte_lengths(tok, vocab: int) -> np.ndarray:
    """UTF-8 byte length of every token (0 for the special token), for bits/byte."""
    lengths = np.zeros(vocab, dtype=np.int64)
    for i in range(vocab):
        s = tok.id_to_token(i)
        if s is not None and s != EOS:
            lengths[i] = len(s)  # byte-level BPE: one printable character per byte
    return lengths


# --------------------------------------------------------------------------- models


def llama(shape: ModelShape, plan: Plan, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=plan.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=plan.seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


def n_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class Batches:
    """Windows of ``seq_len`` tokens from the stream, each epoch in a seeded
    random order with a random offset, so one epoch sees every token once."""

    def __init__(self, stream: np.ndarray, plan: Plan, batch: int, seed: int) -> None:
        self.stream, self.plan, self.batch = stream, plan, batch
        self.rng = np.random.default_rng(seed)
        self.queue: list[int] = []
        self.epochs = 0

    def _refill(self) -> None:
        t = self.plan.seq_len
        offset = int(self.rng.integers(0, t))
        starts = np.arange(offset, len(self.stream) - t, t)
        self.queue = list(self.rng.permutation(starts))
        self.epochs += 1

    def next(self):
        import torch

        rows = []
        for _ in range(self.batch):
            if not self.queue:
                self._refill()
            s = self.queue.pop()
            rows.append(self.stream[s : s + self.plan.seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows))


def optimizer(model, lr: float, plan: Plan):
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": plan.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def lr_at_fraction(frac: float, *, peak: float, plan: Plan) -> float:
    """Linear warm-up over the plan's first ``warmup_frac``, then cosine to 10%
    of the peak; ``frac`` is the fraction of the budget spent (steps or time)."""
    warm = max(1e-9, plan.warmup_frac)
    if frac < warm:
        return peak * max(frac / warm, 1e-3)
    rest = min(1.0, (frac - warm) / max(1e-9, 1 - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * rest)))  # cosine to 10%


def optimise(
    model,
    stream: np.ndarray,
    plan: Plan,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    desc: str,
    metric: str,
    loss_of,
    minutes: float | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_minutes: float = 5.0,
) -> dict:
    """AdamW over ``steps`` batches with the plan's schedule and clipping;
    ``loss_of(x)`` is the loss of one batch. Returns the training record.

    With ``minutes`` the budget is wall time instead (for a shared machine whose
    speed is unknown in advance): the schedule follows the larger of the step
    fraction and the time fraction, and training stops when either reaches 1.
    ``checkpoint(step)`` is called every ``checkpoint_minutes`` so that an
    interrupted run leaves a usable model."""
    import torch

    model.train()
    opt = optimizer(model, lr, plan)
    data = Batches(stream, plan, batch, seed)
    bar = progress(steps, desc)
    start, ema = time.perf_counter(), None
    budget = minutes * 60 if minutes else None
    last_save = last_log = start
    step = 0
    while step < steps:
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed >= budget:
            break
        frac = step / steps if budget is None else max(step / steps, elapsed / budget)
        for g in opt.param_groups:
            g["lr"] = lr_at_fraction(frac, peak=lr, plan=plan)
        loss = loss_of(data.next())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        step += 1
        now = time.perf_counter()
        done = step * batch * plan.seq_len
        bar.update(1)
        bar.set_postfix_str(f"{metric} {ema:.3f} {done / (now - start):.0f} tok/s")
        if now - last_log >= 60:
            last_log = now
            log(
                f"    {desc} step {step}, {(now - start) / 60:.1f} min, {step / (now - start):.2f} steps/s,"
                f" {metric} {ema:.3f}, lr {opt.param_groups[0]['lr']:.2e}, progress {frac:.3f}"
            )
        if checkpoint is not None and now - last_save >= checkpoint_minutes * 60:
            last_save = now
            model.eval()
            checkpoint(step)
            model.train()
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    tokens = step * batch * plan.seq_len
    record = {
        "steps": step,
        "tokens": tokens,
        "epochs": round(tokens / len(stream), 2),
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds),
        f"final_train_{metric.lower()}": round(ema or 0.0, 4),
        "peak_lr": lr,
    }
    if budget is not None:
        record["time_budget_minutes"] = minutes
    return record


def unlikelihood_loss(model, x, alpha: float, window: int):
    """Next-token cross-entropy plus ``alpha`` times token-level unlikelihood
    (Welleck et al., "Neural Text Generation with Unlikelihood Training", 2019):
    at every position, -log(1 - p(c)) for each token ``c`` among the previous
    ``window`` tokens of the context other than the true next one. It teaches
    the model that what it just wrote is not automatically what comes next, the
    cause of greedy decoding's loops (``self.set_set_set...``)."""
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(model(input_ids=x).logits.float()[:, :-1], dim=-1)
    nxt = x[:, 1:]
    mle = F.nll_loss(logp.flatten(0, 1), nxt.flatten())
    seen = F.one_hot(x[:, :-1], logp.shape[-1]).float().cumsum(1)  # counts of each token up to position t
    if window < seen.shape[1]:
        seen = seen - torch.cat([torch.zeros_like(seen[:, :window]), seen[:, :-window]], 1)
    negatives = seen > 0  # tokens among x[t - window + 1 .. t]
    negatives.scatter_(2, nxt.unsqueeze(-1), False)  # never the true next token
    ul = -(torch.log((1 - logp.exp()).clamp(min=1e-5)) * negatives).sum() / nxt.numel()
    return mle + alpha * ul


def train_target(
    model,
    stream: np.ndarray,
    plan: Plan,
    seed: int,
    *,
    minutes: float | None = None,
    checkpoint=None,
    unlikelihood: float = 0.0,
    ul_window: int = 16,
) -> dict:
    """Next-token cross-entropy (plus ``unlikelihood`` times the unlikelihood term)."""

    def loss_of(x):
        if unlikelihood > 0:
            return unlikelihood_loss(model, x, unlikelihood, ul_window)
        return model(input_ids=x, labels=x).loss

    return optimise(
        model,
        stream,
        plan,
        steps=plan.target_steps,
        lr=plan.target_lr,
        batch=plan.target_batch,
        seed=seed,
        desc="target",
        metric="loss",
        loss_of=loss_of,
        minutes=minutes,
        checkpoint=checkpoint,
        checkpoint_minutes=plan.checkpoint_minutes,
    )


def distill_drafter(
    drafter, target, stream: np.ndarray, plan: Plan, seed: int, *, minutes: float | None = None, checkpoint=None
) -> dict:
    """KL(target || drafter) on the target's full next-token distributions."""
    import torch
    import torch.nn.functional as F

    target.eval()

    def kl(x):
        with torch.inference_mode():
            p_log = F.log_softmax(target(input_ids=x).logits.float(), dim=-1)
        p_log = p_log.clone()  # out of inference mode, usable in autograd
        q_log = F.log_softmax(drafter(input_ids=x).logits.float(), dim=-1)
        v = q_log.shape[-1]
        return F.kl_div(q_log.view(-1, v), p_log.view(-1, v), log_target=True, reduction="batchmean")

    return optimise(
        drafter,
        stream,
        plan,
        steps=plan.drafter_steps,
        lr=plan.drafter_lr,
        batch=plan.drafter_batch,
        seed=seed + 1,
        desc="drafter",
        metric="KL",
        loss_of=kl,
        minutes=minutes,
        checkpoint=checkpoint,
        checkpoint_minutes=plan.checkpoint_minutes,
    )


def save_model(model, tokenizer_dir: Path, out: Path) -> None:
    """config + 16-bit safetensors + tokenizer + generation config."""
    import torch
    from transformers import GenerationConfig

    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False)
    half = model.to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)
    model.float()
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)


def reload(path: Path):
    """The saved 16-bit weights, as dsi runs them on a CPU (upcast to float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- evaluation


def heldout_loss(model, stream: np.ndarray, plan: Plan, byte_len: np.ndarray, desc: str) -> dict:
    import torch
    import torch.nn.functional as F

    t = plan.seq_len
    starts = list(range(0, len(stream) - 1, t))
    nll, count, nbytes = 0.0, 0, 0
    bar = progress(len(starts), desc)
    with torch.inference_mode():
        for i in range(0, len(starts), plan.eval_batch):
            rows = [stream[s : s + t + 1].astype(np.int64) for s in starts[i : i + plan.eval_batch]]
            full = [r for r in rows if len(r) == t + 1]
            groups = ([np.stack(full)] if full else []) + [r[None] for r in rows if len(r) != t + 1]
            for g in groups:  # full windows as one batch; the short last one alone
                x = torch.from_numpy(g)
                logits = model(input_ids=x[:, :-1]).logits.float()
                nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
                count += x[:, 1:].numel()
                nbytes += int(byte_len[g[:, 1:]].sum())
            bar.update(len(rows))
    bar.close()
    return {
        "tokens": count,
        "loss_nats_per_token": round(nll / count, 4),
        "perplexity": round(math.exp(nll / count), 3),
        "bits_per_byte": round(nll / math.log(2) / max(1, nbytes), 4),
    }


DEF_LINE = re.compile(r"^[ \t]*(async[ \t]+)?def[ \t]+\w+\(.*\)(\s*->\s*[^:]+)?:[ \t]*$")


def heldout_prompts(corpus: Corpus, plan: Plan, seed: int) -> list[str]:
    """Code-completion prompts from held-out files: a one-line ``def`` with up to
    8 lines (400 characters) of the code before it, ending at the colon (the
    model writes the body)."""
    candidates = []
    for _rel, text in corpus.heldout:
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if DEF_LINE.match(line):
                before: list[str] = []
                for prev in reversed(lines[max(0, i - 8) : i]):
                    if sum(len(b) + 1 for b in before) + len(prev) + 1 > 400:
                        break
                    before.insert(0, prev)
                candidates.append("\n".join([*before, line.rstrip()]))
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(candidates), size=min(plan.num_prompts, len(candidates)), replace=False))
    return [candidates[i] for i in pick]


async def engine_acceptance(
    target_dir: Path,
    drafter_dir: Path,
    prompts: list[str],
    new_tokens: int,
    temperature: float,
    seeds: list[int],
    lookahead: int,
) -> dict:
    """Acceptance through dsi's own engine (SI: deterministic positions, so the
    greedy figure is reproducible), pooled over prompts and seeds."""
    from transformers import AutoTokenizer

    from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
    from dsi.domain.types import SamplingParams
    from services.coordinator.engine import Engine, GenerationParams, Strategy

    tok = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    target = LocalTarget(load_target_model(str(target_dir)))
    drafter = LocalDrafter(load_drafter_model(str(drafter_dir)))
    info = target.model.info
    engine = Engine(
        [target],
        [drafter],
        eos_token_ids=info.eos_token_ids,
        max_context=info.max_context_tokens,
        vocab_size=info.vocab_size,
    )
    accepted = decided = new = 0
    for prompt in prompts:
        for seed in seeds:
            params = GenerationParams(
                max_new_tokens=new_tokens,
                sampling=SamplingParams.create(temperature),
                seed=seed,
                strategy=Strategy.SI,
                lookahead=lookahead,
            )
            gen = engine.generate(tok.encode(prompt), params)
            async for _ in gen.tokens():
                pass
            accepted += gen.stats.accepted_tokens
            decided += gen.stats.decided_drafts
            new += gen.stats.new_tokens
    return {
        "acceptance_rate": round(accepted / max(1, decided), 4),
        "accepted": accepted,
        "decided_drafts": decided,
        "new_tokens": new,
        "prompts": len(prompts),
        "seeds": seeds,
        "temperature": temperature,
        "lookahead": lookahead,
        "max_new_tokens": new_tokens,
        "strategy": "si",
    }


# --------------------------------------------------------------------------- cards


def machine() -> str:
    import torch

    from dsi.tools.experiments.bench import machine as describe

    return f"{describe()}, torch.set_num_threads({torch.get_num_threads()}), torch {torch.__version__}"


def loops_row(report: dict) -> str:
    """The card's table row for the everyday-prompt loop count (if measured)."""
    e = report.get("everyday")
    if not e:
        return ""
    return (
        f"| Greedy loops, everyday prompts | **{e['loops']}/{e['prompts']}** {e['new_tokens']}-token completions"
        f" of the target loop (last {e['loop_window']} tokens = a repeated block of at most {e['loop_max_period']};"
        " prompts and completions in `../eval.json`) |\n"
    )


def extra_data(report: dict) -> str:
    """The card's sentence on extra training packages, if any run used them."""
    used = {}
    for run in [report["corpus"], *report.get("target_training_more", [])]:
        for p in run.get("packages", []):
            used.setdefault(p["name"], p)
    if not used:
        return ""
    listing = ", ".join(f"{p['name']} {p['version']} ({p['licence']})" for p in used.values())
    mb = sum(p["train_bytes"] for p in used.values()) / 1e6
    return (
        f" Later training also read the train-split files ({mb:.1f} MB) of these installed packages, chosen for"
        f" permissive licences by `tools/package_sources.py`: {listing}; the held-out set stays the stdlib's."
    )


def reproduce_commands(report: dict) -> list[str]:
    """The pair's training commands in the order they ran (later runs carry a UTC time, ``at``)."""
    later = [*report.get("drafter_training_more", []), *report.get("target_training_more", [])]
    if "at" in report.get("drafter_training", {}):  # a drafter made later (--new-drafter): the replaced one's runs go
        later.append(report["drafter_training"])
    commands = [report["command"]]
    for run in sorted(later, key=lambda m: m.get("at", "")):
        if run["command"] not in commands:
            commands.append(run["command"])
    return commands


def card(role: str, name: str, report: dict) -> str:
    r = report
    m = r["models"][role]
    pair = r["acceptance"]
    data = r["corpus"]
    other = DRAFTER_NAME if role == "target" else TARGET_NAME
    if role == "target":
        training = (
            f"Next-token cross-entropy, {r['target_training']['steps']} steps of {r['plan']['target_batch']} x"
            f" {r['plan']['seq_len']} tokens = {r['target_training']['tokens']:,} tokens"
            f" ({r['target_training']['epochs']} epochs of the train split), AdamW (betas 0.9/0.95, weight decay"
            f" 0.1), peak learning rate {r['target_training']['peak_lr']}, 5% warm-up then cosine to 10%, gradient"
            f" clipping 1.0; {r['target_training']['seconds'] / 60:.1f} min"
            f" ({r['target_training']['tokens_per_second']} tokens/s)."
        )
        if r["target_training"].get("time_budget_minutes"):
            training += (
                f" The budget was wall time ({r['target_training']['time_budget_minutes']:g} min): the schedule"
                " followed the fraction of it spent."
            )
        for more in r.get("target_training_more", []):
            n = len(more.get("packages", []))
            extra = f": the train split plus the train-split files of {n} installed packages, listed above" if n else ""
            training += (
                f" Then trained further from those weights (a fresh AdamW, data order seed {more['seed']}):"
                f" {more['steps']} steps = {more['tokens']:,} tokens ({more['epochs']} epochs of"
                f" {more['train_tokens']:,} training tokens{extra}),"
                f" peak learning rate {more['peak_lr']}, {more.get('warmup_frac', 0.05):.0%} warm-up then cosine to"
                f" 10% by wall time ({more.get('time_budget_minutes', 0):g} min); {more['seconds'] / 60:.1f} min"
                f" ({more['tokens_per_second']} tokens/s)."
            )
            if more.get("unlikelihood"):
                ul = more["unlikelihood"]
                training += (
                    f" Loss: cross-entropy plus {ul['alpha']:g} x token-level unlikelihood (Welleck et al. 2019) on"
                    f" the previous {ul['window']} tokens, against greedy loops."
                )
            if more.get("note"):
                training += f" {more['note']}"
    else:
        init = r["drafter_training"].get("init_layers")
        training = (
            f"Cut from `{TARGET_NAME}`: its token embedding (tied to the output head), final norm and layers"
            f" {init} (of {r['plan']['target']['layers']}), then distilled"
            if init
            else "Distilled"
        ) + (
            f" from `{TARGET_NAME}` (its 16-bit weights as shipped): KL(target || drafter) on the"
            f" target's full next-token distribution at every position of training-split windows,"
            f" {r['drafter_training']['steps']} steps of {r['plan']['drafter_batch']} x {r['plan']['seq_len']} tokens ="
            f" {r['drafter_training']['tokens']:,} tokens, AdamW, peak learning rate"
            f" {r['drafter_training']['peak_lr']}; {r['drafter_training']['seconds'] / 60:.1f} min"
            f" ({r['drafter_training']['tokens_per_second']} tokens/s)."
        )
        for more in r.get("drafter_training_more", []):
            training += (
                f" Then distilled further from those weights (a fresh AdamW, data order seed {more['seed']}):"
                f" {more['steps']} steps = {more['tokens']:,} tokens, peak learning rate {more['peak_lr']};"
                f" {more['seconds'] / 60:.1f} min ({more['tokens_per_second']} tokens/s)."
            )
            if more.get("on_policy"):
                op = more["on_policy"]
                training += (
                    f" Its data: the target's own continuations (on-policy distillation, DistillSpec):"
                    f" {op['samples']} training-split prompts of {op['prompt_tokens']} tokens, each continued"
                    f" {op['new_tokens']} tokens by `{TARGET_NAME}`, greedy and sampled (T=1) in turns"
                    f" ({op['tokens']:,} tokens, {op['seconds'] / 60:.1f} min to generate)."
                )
    g, s = pair["greedy"], pair["sampled"]
    ppl = r["heldout"][role]
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [code, python, speculative-decoding, dsi]
---

# {name}

The {"target" if role == "target" else "drafter"} of dsi's demo pair (`{TARGET_NAME}` + `{DRAFTER_NAME}`), a tiny
Python code-completion model trained from scratch on the Python standard library's own source, so that
`dsi up` shows real speculative inference on a fresh machine with no download. It is a demo: it writes
plausible-looking Python, not correct programs.

| | |
|---|---|
| Architecture | `LlamaForCausalLM`: {m["layers"]} layers, hidden {m["hidden"]}, MLP {m["intermediate"]}, {m["heads"]} heads ({m["kv_heads"]} key/value heads), RoPE, tied embeddings |
| Parameters | {m["parameters"]:,} ({m["parameters"] / 1e6:.2f}M){f"; {r['models']['target']['parameters'] / m['parameters']:.1f}x fewer than the target" if role == "drafter" else ""} |
| Weights | float16 safetensors, {m["weights_bytes"] / 1e6:.1f} MB (folder {m["folder_bytes"] / 1e6:.1f} MB) |
| Context | {r["plan"]["seq_len"]} tokens (the training length) |
| Tokenizer | byte-level BPE, {r["plan"]["vocab"]} tokens (`tokenizers`), trained on the train split; `<|endoftext|>` (id 0) ends each file and is the EOS/BOS/pad token; shared with `{other}` |
| Held-out perplexity | **{ppl["perplexity"]}** per token ({ppl["loss_nats_per_token"]} nats/token, {ppl["bits_per_byte"]} bits/byte) on {ppl["tokens"]:,} held-out tokens |
| Pair acceptance, greedy | **{g["acceptance_rate"]:.3f}** ({g["accepted"]}/{g["decided_drafts"]} drafts) |
| Pair acceptance, sampled (T={s["temperature"]}) | **{s["acceptance_rate"]:.3f}** ({s["accepted"]}/{s["decided_drafts"]} drafts, seeds {s["seeds"]}) |
{loops_row(r)}
## Data

The `.py` files of the standard library of Python {data["python"]} (`sysconfig.get_paths()["stdlib"]`),
excluding test packages (`test/`, `tests/`, `idle_test/`, `test_*.py`), `site-packages/`, and generated data
(`pydoc_data/topics.py`, the `gencodec.py` charmap tables). Split by file: a file is held out when the SHA-256 of
its path relative to the stdlib is 0 modulo {HELDOUT_MODULUS}, so the split does not depend on the machine's
file order. Train: {data["train_files"]} files, {data["train_bytes"] / 1e6:.2f} MB, {r["stream"]["train_tokens"]:,}
tokens; held out: {data["heldout_files"]} files, {data["heldout_bytes"] / 1e6:.2f} MB,
{r["stream"]["heldout_tokens"]:,} tokens (file list digest `{data["file_list_sha256"]}`). Other Python versions
have a slightly different stdlib, hence slightly different data.{extra_data(r)}

## Training

{training}
Seed {r["seed"]}, float32 on the CPU. Machine: {r["machine"]}.
Whole pipeline (tokenizer, target, drafter, evaluation): **{r["wall_seconds"] / 60:.1f} min** wall time
(stages in seconds: {r["stage_seconds"]}; load average {r["load_average_at_start"]} at the start and
{r["load_average_at_end"]} at the end: the machine was {"shared with other work" if max(r["load_average_at_start"][1], r["load_average_at_end"][1]) > 0.5 else "otherwise idle"}).

## Evaluation

- Perplexity: the held-out files as one token stream (each file followed by `<|endoftext|>`), in
  non-overlapping windows of {r["plan"]["seq_len"]} tokens, with the 16-bit weights as shipped (run in float32).
- Acceptance rate: through dsi's own engine (`services.coordinator.engine.Engine`, in-process `LocalTarget` /
  `LocalDrafter` on these folders), strategy SI, lookahead {g["lookahead"]}, {g["max_new_tokens"]} new tokens for
  each of {g["prompts"]} held-out prompts (a one-line `def` with up to 8 lines of the code before it, ending at
  the colon; listed in `../eval.json`). Rate = drafts accepted / drafts whose position was decided, pooled. Sampled
  means temperature {s["temperature"]}, no top-k/top-p, with dsi's keyed Gumbel-max decision rule.
- `tests/test_demo_models.py` re-measures greedy acceptance on the first {r["test_subset"]["prompts"]} prompts
  ({r["test_subset"]["max_new_tokens"]} new tokens): {r["test_subset"]["acceptance_rate"]:.3f} when trained.

## Use

```bash
dsi up                                    # serves this pair (the default)
dsi generate "def fibonacci(n):"
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("models/{name}")
model = AutoModelForCausalLM.from_pretrained("models/{name}")
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=60, do_sample=False)[0]))
```

## Reproduce

```bash
{chr(10).join(reproduce_commands(r))}
```
"""  # noqa: E501 - markdown table rows


def write_cards(out: Path, report: dict) -> None:
    """Both model cards (README.md) from the report; updates the folder sizes."""
    for role in ("target", "drafter"):
        path = out / report["models"][role]["name"]
        (path / "README.md").write_text(card(role, path.name, report))
        report["models"][role]["folder_bytes"] = dir_size(path)


# --------------------------------------------------------------------------- main


def measure_again(out: Path) -> int:
    """Re-measure the acceptance figures of an existing pair (e.g. after the
    decision rule changed) with the prompts and settings of its eval.json."""
    report = json.loads((out / "eval.json").read_text())
    target_dir, drafter_dir = (out / report["models"][role]["name"] for role in ("target", "drafter"))

    async def measure() -> dict:
        got = {}
        for name, fig in report["acceptance"].items():
            got[name] = await engine_acceptance(
                target_dir,
                drafter_dir,
                report["prompts"],
                fig["max_new_tokens"],
                fig["temperature"],
                fig["seeds"],
                fig["lookahead"],
            )
        return got

    print(json.dumps(asyncio.run(measure()), indent=1))
    return 0


def evaluate_pair(out: Path, report: dict, plan: Plan, corpus: Corpus, tok, *, models: tuple) -> None:
    """Held-out perplexity of both models, the pair's acceptance (greedy,
    sampled, the test subset) and the everyday-prompt loops, into ``report``."""
    from tools.demo_quality import everyday_eval

    target, drafter = models
    target_dir, drafter_dir = out / TARGET_NAME, out / DRAFTER_NAME
    heldout_stream = encode(tok, corpus.heldout)
    byte_len = token_byte_lengths(tok, plan.vocab)
    report["heldout"] = {
        "target": heldout_loss(target, heldout_stream, plan, byte_len, "held-out target"),
        "drafter": heldout_loss(drafter, heldout_stream, plan, byte_len, "held-out drafter"),
    }
    log(f"    {report['heldout']}")
    prompts = heldout_prompts(corpus, plan, report["seed"])
    seeds = list(range(plan.sampled_seeds))

    async def measure() -> dict:
        return {
            "greedy": await engine_acceptance(
                target_dir, drafter_dir, prompts, plan.new_tokens, 0.0, [0], plan.lookahead
            ),
            "sampled": await engine_acceptance(
                target_dir, drafter_dir, prompts, plan.new_tokens, plan.temperature, seeds, plan.lookahead
            ),
            "test_subset": await engine_acceptance(
                target_dir, drafter_dir, prompts[: plan.test_prompts], plan.test_new_tokens, 0.0, [0], plan.lookahead
            ),
        }

    measured = asyncio.run(measure())
    report["acceptance"] = {"greedy": measured["greedy"], "sampled": measured["sampled"]}
    report["test_subset"] = measured["test_subset"]
    log(
        f"    greedy {measured['greedy']['acceptance_rate']}, sampled {measured['sampled']['acceptance_rate']},"
        f" test subset {measured['test_subset']['acceptance_rate']}"
    )
    report["everyday"] = everyday_eval(target_dir)
    log(f"    greedy loops on everyday prompts: {report['everyday']['loops']}/{report['everyday']['prompts']}")
    report["prompts"] = prompts


def drafter_from_target(target, layers: list[int]):
    """A drafter cut from ``target``: its shape but only ``layers`` (in that
    order), with the target's token embedding (tied to the output head), those
    layers' weights and its final norm. A start for distillation much closer to
    the target than random weights (the residual stream after the kept layers
    already reads through the target's own norm and head)."""
    import copy

    import torch

    n = target.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"--new-drafter layers must be in 0..{n - 1}, got {layers}")
    drafter = copy.deepcopy(target)
    drafter.model.layers = torch.nn.ModuleList(drafter.model.layers[i] for i in layers)
    for j, layer in enumerate(drafter.model.layers):
        layer.self_attn.layer_idx = j
    drafter.config.num_hidden_layers = len(layers)
    if getattr(drafter.config, "layer_types", None):
        drafter.config.layer_types = [drafter.config.layer_types[i] for i in layers]
    return drafter.train()


def target_continuations(
    target, stream: np.ndarray, seed: int, minutes: float, *, prompt: int = 128, new: int = 384, batch: int = 16
) -> tuple[np.ndarray, dict]:
    """On-policy data for distillation (DistillSpec, Zhou et al. 2023): the
    target's own continuations of training-split prompts of ``prompt`` tokens,
    ``new`` tokens each, batches alternating greedy and sampled (temperature 1),
    for ``minutes`` of wall time; returned as one stream, each sample (prompt
    and continuation) followed by EOS, with a record of what was made."""
    import torch

    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    start, greedy = time.perf_counter(), True
    with torch.inference_mode():
        while not rows or time.perf_counter() - start < minutes * 60:  # at least one batch
            starts = rng.integers(0, len(stream) - prompt, size=batch)
            x = torch.from_numpy(np.stack([stream[s : s + prompt].astype(np.int64) for s in starts]))
            out = target.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=not greedy,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=0,
            )
            rows.extend(np.append(r, 0) for r in out.numpy())
            greedy = not greedy
            log(f"    continuations: {len(rows)} samples, {(time.perf_counter() - start) / 60:.1f} min")
    data = np.concatenate(rows).astype(np.int32)
    record = {"samples": len(rows), "prompt_tokens": prompt, "new_tokens": new, "tokens": len(data)}
    record["seconds"] = round(time.perf_counter() - start, 1)
    return data, record


def distill_more(
    out: Path,
    minutes: float,
    lr: float,
    seed: int,
    command: str,
    steps: int | None = None,
    new_drafter: list[int] | None = None,
    on_policy: float = 0.0,
) -> int:
    """Distil the drafter of the pair in ``out`` further (a fresh AdamW with
    peak ``lr``, the plan's schedule over ``minutes``, data order from ``seed``),
    from the target as shipped; then measure the pair again and update
    eval.json and the cards. ``minutes=0`` only measures again. With
    ``new_drafter`` (target layer indices), the drafter is replaced by one cut
    from the target (:func:`drafter_from_target`) before distilling."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    report = json.loads((out / "eval.json").read_text())
    plan = replace(Plan(**{**report["plan"], "target": ModelShape(**report["plan"]["target"])}), drafter_lr=lr)
    plan = replace(plan, drafter=ModelShape(**report["plan"]["drafter"]), drafter_steps=steps or Plan().drafter_steps)
    target_dir, drafter_dir = out / TARGET_NAME, out / DRAFTER_NAME
    tok = Tokenizer.from_file(str(target_dir / "tokenizer.json"))  # the pair's own tokenizer
    corpus = load_corpus(pair_packages(report))
    target = reload(target_dir)
    if new_drafter:
        drafter = drafter_from_target(target, new_drafter)
        plan = replace(plan, drafter=replace(plan.target, layers=len(new_drafter)))
        report["plan"]["drafter"] = asdict(plan.drafter)
        report["models"]["drafter"] = {"name": DRAFTER_NAME, **asdict(plan.drafter), "parameters": n_params(drafter)}
    else:
        drafter = reload(drafter_dir)
    if minutes > 0:
        log(f"distilling {DRAFTER_NAME} {minutes:g} min more")
        tok_dir = Path(tempfile.mkdtemp(prefix="dsi-tok-"))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(target_dir / name, tok_dir / name)
        ckpt = out / "checkpoints" / DRAFTER_NAME

        def checkpoint(step: int) -> None:
            save_model(drafter, tok_dir, ckpt)
            log(f"checkpoint: {ckpt} at step {step}")

        data, made = encode(tok, corpus.train), None
        if on_policy:
            log(f"target continuations for {on_policy:g} min")
            data, made = target_continuations(target, data, seed, on_policy)
        record = distill_drafter(drafter, target, data, plan, seed, minutes=minutes, checkpoint=checkpoint)
        if made is not None:
            record["on_policy"] = made
        save_model(drafter, tok_dir, drafter_dir)
        drafter = reload(drafter_dir)
        shutil.rmtree(tok_dir, ignore_errors=True)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {**record, "seed": seed, "command": command, "at": at}
        if new_drafter:
            # A new drafter: its history starts here; the replaced one's stays on record.
            report.setdefault("replaced_drafters", []).append(
                {k: report.pop(k) for k in ("drafter_training", "drafter_training_more") if k in report}
            )
            report["drafter_training"] = {**record, "init_layers": new_drafter}
        else:
            report.setdefault("drafter_training_more", []).append(record)
    log("evaluation")
    evaluate_pair(out, report, plan, corpus, tok, models=(target, drafter))
    for role, path in (("target", target_dir), ("drafter", drafter_dir)):
        report["models"][role]["weights_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    write_cards(out, report)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


def pair_packages(report: dict) -> list[str]:
    """The extra packages (tools/package_sources.py) any run of the pair trained on, in first-use order."""
    names: list[str] = []
    for run in [report["corpus"], *report.get("target_training_more", [])]:
        for p in run.get("packages", []):
            if p["name"] not in names:
                names.append(p["name"])
    return names


def target_more(
    out: Path,
    minutes: float,
    lr: float,
    seed: int,
    command: str,
    *,
    extra_packages: list[str],
    drafter_minutes: float | None,
    drafter_lr: float,
    unlikelihood: float = 0.0,
    ul_window: int = 16,
    warmup: float | None = None,
) -> int:
    """Train the target of the pair in ``out`` further from its shipped weights
    (a fresh AdamW with peak ``lr``, the plan's warm-up and cosine schedule over
    ``minutes``, data order from ``seed``, the pair's own tokenizer; the train
    split plus ``extra_packages``), then distil the existing drafter
    ``drafter_minutes`` more against the new target, measure the pair again and
    update eval.json and the cards. Checkpoints go to ``<out>/checkpoints/``."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    report = json.loads((out / "eval.json").read_text())
    plan = Plan(
        **{
            **report["plan"],
            "target": ModelShape(**report["plan"]["target"]),
            "drafter": ModelShape(**report["plan"]["drafter"]),
        }
    )
    plan = replace(plan, target_lr=lr, target_steps=10**6, drafter_lr=drafter_lr, drafter_steps=10**6)
    if warmup is not None:
        plan = replace(plan, warmup_frac=warmup)
    target_dir, drafter_dir = out / TARGET_NAME, out / DRAFTER_NAME
    tok = Tokenizer.from_file(str(target_dir / "tokenizer.json"))  # the pair's own tokenizer
    corpus = load_corpus(extra_packages)
    train_stream = encode(tok, corpus.train)
    tok_dir = Path(tempfile.mkdtemp(prefix="dsi-tok-"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(target_dir / name, tok_dir / name)

    def checkpointer(model, name: str):
        def save(step: int) -> None:
            path = out / "checkpoints" / name
            save_model(copy.deepcopy(model), tok_dir, path)
            (path / "step.txt").write_text(f"{step}\n")
            log(f"    checkpoint {path} (step {step})")

        return save

    load = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    target = reload(target_dir)
    log(f"training {TARGET_NAME} {minutes:g} min more on {len(train_stream):,} tokens (extra: {extra_packages or '-'})")
    record = train_target(
        target,
        train_stream,
        plan,
        seed,
        minutes=minutes,
        checkpoint=checkpointer(target, TARGET_NAME),
        unlikelihood=unlikelihood,
        ul_window=ul_window,
    )
    record["warmup_frac"] = plan.warmup_frac
    if unlikelihood > 0:
        record["unlikelihood"] = {"alpha": unlikelihood, "window": ul_window}
    record["epochs"] = round(record["tokens"] / len(train_stream), 2)
    save_model(target, tok_dir, target_dir)
    target = reload(target_dir)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    more = {
        **record,
        "seed": seed,
        "command": command,
        "at": at,
        "train_tokens": len(train_stream),
        "load_average_at_start": load,
        **({"packages": corpus.packages} if corpus.packages else {}),
    }
    report.setdefault("target_training_more", []).append(more)
    report["stage_seconds"]["target_more"] = round(time.perf_counter() - t0, 1)
    drafter = reload(drafter_dir)
    if drafter_minutes:
        t1 = time.perf_counter()
        log(f"distilling {DRAFTER_NAME} {drafter_minutes:g} min more against the new target")
        rec = distill_drafter(
            drafter,
            target,
            train_stream,
            plan,
            seed,
            minutes=drafter_minutes,
            checkpoint=checkpointer(drafter, DRAFTER_NAME),
        )
        save_model(drafter, tok_dir, drafter_dir)
        drafter = reload(drafter_dir)
        report.setdefault("drafter_training_more", []).append({**rec, "seed": seed, "command": command, "at": at})
        report["stage_seconds"]["drafter_more_after_target_more"] = round(time.perf_counter() - t1, 1)
    shutil.rmtree(tok_dir, ignore_errors=True)
    log("evaluation")
    t2 = time.perf_counter()
    evaluate_pair(out, report, plan, load_corpus(pair_packages(report)), tok, models=(target, drafter))
    report["stage_seconds"]["evaluation_after_target_more"] = round(time.perf_counter() - t2, 1)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for role, path in (("target", target_dir), ("drafter", drafter_dir)):
        report["models"][role]["weights_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    write_cards(out, report)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "models", help="output folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--target-steps", type=int, help="override the plan's target training steps")
    ap.add_argument("--drafter-steps", type=int, help="override the plan's drafter distillation steps")
    ap.add_argument(
        "--target-shape",
        help="override the target's shape: HIDDEN,LAYERS,MLP,HEADS,KV_HEADS (e.g. 256,6,704,4,2)",
    )
    ap.add_argument("--target-lr", type=float, help="override the target's peak learning rate")
    ap.add_argument(
        "--target-minutes",
        type=float,
        help="wall-time budget of the target (schedule and stop by time as well as steps; for a shared machine)",
    )
    ap.add_argument("--drafter-minutes", type=float, help="wall-time budget of the drafter's distillation")
    ap.add_argument("--drafter-lr", type=float, help="override the drafter's peak learning rate")
    ap.add_argument(
        "--distill-more",
        type=float,
        metavar="MINUTES",
        help="train no target: distil the drafter in --out MINUTES more (fresh optimizer, peak --drafter-lr,"
        " default half the plan's; data order from --seed), then measure the pair again and update eval.json and"
        " the cards (0: only measure again)",
    )
    ap.add_argument(
        "--new-drafter",
        metavar="LAYERS",
        help="with --distill-more: first replace the drafter by one cut from the target, with the target's width,"
        " embedding, final norm and these of its layers (comma-separated indices, e.g. 0,5), then distil it",
    )
    ap.add_argument(
        "--on-policy",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="with --distill-more: distil on the target's own continuations of training-split prompts (greedy and"
        " sampled), generated for MINUTES first, instead of the source text (DistillSpec)",
    )
    ap.add_argument(
        "--target-more",
        type=float,
        metavar="MINUTES",
        help="train the target in --out MINUTES more from its weights (fresh optimizer, peak --target-lr, default a"
        " third of the plan's; data order from --seed; plus --extra-packages), then distil its drafter"
        " --drafter-minutes more (peak --drafter-lr, default half the plan's), measure the pair again and update"
        " eval.json and the cards",
    )
    ap.add_argument(
        "--unlikelihood",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="with --target-more: add ALPHA x token-level unlikelihood on the previous --ul-window tokens to the"
        " target's loss (fewer greedy loops; default 0: off)",
    )
    ap.add_argument("--ul-window", type=int, default=16, help="unlikelihood's window of previous tokens (default 16)")
    ap.add_argument(
        "--warmup", type=float, help="with --target-more: the warm-up fraction of the schedule (default: the plan's)"
    )
    ap.add_argument(
        "--extra-packages",
        metavar="NAMES|suggested",
        help="also train on the source of these installed packages (comma-separated distribution names, or"
        " 'suggested': tools/package_sources.py's list), permissive licences only; the held-out set stays the"
        " stdlib's",
    )
    ap.add_argument("--quick", action="store_true", help="toy sizes and steps: a smoke test of the pipeline")
    ap.add_argument(
        "--measure-acceptance",
        action="store_true",
        help="train nothing: measure the pair in --out again (greedy and sampled, the prompts, seeds and settings"
        " of its eval.json) through the current engine, and print the figures as JSON",
    )
    args = ap.parse_args(argv)
    extra_packages: list[str] = []
    if args.extra_packages:
        from tools.package_sources import SUGGESTED

        extra_packages = list(SUGGESTED) if args.extra_packages == "suggested" else args.extra_packages.split(",")
    if args.measure_acceptance:
        return measure_again(args.out.resolve())
    if args.target_more is not None:
        import torch

        torch.set_num_threads(args.threads)
        command = "nice -n 19 .venv/bin/python tools/train_demo_models.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])
        )
        return target_more(
            args.out.resolve(),
            args.target_more,
            args.target_lr or Plan().target_lr / 3,
            args.seed,
            command,
            extra_packages=extra_packages,
            drafter_minutes=args.drafter_minutes,
            drafter_lr=args.drafter_lr or Plan().drafter_lr / 2,
            unlikelihood=args.unlikelihood,
            ul_window=args.ul_window,
            warmup=args.warmup,
        )
    if args.distill_more is not None:
        import torch

        torch.set_num_threads(args.threads)
        command = "nice -n 19 .venv/bin/python tools/train_demo_models.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])
        )
        lr = args.drafter_lr or Plan().drafter_lr / 2
        layers = [int(v) for v in args.new_drafter.split(",")] if args.new_drafter else None
        return distill_more(
            args.out.resolve(), args.distill_more, lr, args.seed, command, args.drafter_steps, layers, args.on_policy
        )

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    plan = QUICK if args.quick else Plan()
    over = {}
    if args.target_steps:
        over["target_steps"] = args.target_steps
    if args.drafter_steps:
        over["drafter_steps"] = args.drafter_steps
    if args.target_shape:
        over["target"] = ModelShape(*(int(v) for v in args.target_shape.split(",")))
    if args.target_lr:
        over["target_lr"] = args.target_lr
    if args.drafter_lr:
        over["drafter_lr"] = args.drafter_lr
    if over:
        from dataclasses import replace

        plan = replace(plan, **over)
    t0 = time.perf_counter()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dsi-train-"))
    command = "nice -n 19 .venv/bin/python tools/train_demo_models.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    report: dict = {"seed": args.seed, "plan": asdict(plan), "command": command, "machine": machine()}
    report["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    stages: dict[str, float] = {}
    report["stage_seconds"] = stages

    def stage_done(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - since, 1)
        return now

    log("1/5 corpus")
    corpus = load_corpus(extra_packages)
    report["corpus"] = corpus.describe()
    log(f"    {report['corpus']}")

    t = stage_done("corpus", t0)
    log("2/5 tokenizer")
    tok_dir = work / "tokenizer"
    tok = train_tokenizer(corpus, plan, tok_dir)
    train_stream = encode(tok, corpus.train)
    report["stream"] = {
        "train_tokens": len(train_stream),
        "heldout_tokens": len(encode(tok, corpus.heldout)),
        "train_bytes_per_token": round(report["corpus"]["train_bytes"] / len(train_stream), 3),
    }
    log(f"    {report['stream']}")

    t = stage_done("tokenizer", t)
    log("3/5 target")
    target = llama(plan.target, plan, args.seed)
    target_dir, drafter_dir = out / TARGET_NAME, out / DRAFTER_NAME

    def checkpointer(model, name: str):
        def save(step: int) -> None:
            path = out / "checkpoints" / name
            save_model(copy.deepcopy(model), tok_dir, path)  # a copy: the training weights stay float32
            (path / "step.txt").write_text(f"{step}\n")
            log(f"    checkpoint {path} (step {step})")

        return save

    report["target_training"] = train_target(
        target,
        train_stream,
        plan,
        args.seed,
        minutes=args.target_minutes,
        checkpoint=checkpointer(target, TARGET_NAME),
    )
    save_model(target, tok_dir, target_dir)
    target = reload(target_dir)  # distil from (and evaluate) exactly what ships

    t = stage_done("target", t)
    log("4/5 drafter")
    drafter = llama(plan.drafter, plan, args.seed + 1)
    report["drafter_training"] = distill_drafter(
        drafter,
        target,
        train_stream,
        plan,
        args.seed,
        minutes=args.drafter_minutes,
        checkpoint=checkpointer(drafter, DRAFTER_NAME),
    )
    save_model(drafter, tok_dir, drafter_dir)
    drafter = reload(drafter_dir)

    t = stage_done("drafter", t)
    log("5/5 evaluation")
    evaluate_pair(out, report, plan, corpus, tok, models=(target, drafter))
    stage_done("evaluation", t)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["models"] = {}
    for role, shape, path, model in (
        ("target", plan.target, target_dir, target),
        ("drafter", plan.drafter, drafter_dir, drafter),
    ):
        report["models"][role] = {
            "name": path.name,
            **asdict(shape),
            "parameters": n_params(model),
            "weights_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
            "folder_bytes": dir_size(path),
        }
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_cards(out, report)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    total = dir_size(target_dir) + dir_size(drafter_dir) + (out / "eval.json").stat().st_size
    log(f"done in {report['wall_seconds'] / 60:.1f} min; {out}: {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
