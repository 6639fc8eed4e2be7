"""Real-size models on one GPU, without downloading anything
(``tools/gpu_bench.sh`` runs the steps in order).

- ``build``: random-weight Llama-architecture models from configs, made on
  the device: a target (``gpu``: 3.2B parameters, Llama-3.2-3B's shape;
  ``gpu-8b``: Llama-3-8B's) and an independent drafter (78M, same 128k
  vocabulary), or ``tiny`` ones for a CPU check of the whole script.
- ``measure``: their real TTFT (a 128-token prompt), TPOT (a one-token step
  on the KV cache) and cost per verified token, on the device, into an
  experiment file: the HF models themselves (one target replica: one GPU)
  and a synthetic profile with the measured latencies and N target replicas
  (as on N such GPUs).
- ``lossless``: greedy output of every strategy (non-SI, SI, DSI, chains and
  a tree; with the drafter and with the target as its own drafter) against
  ``generate(do_sample=False)`` of the same model on the same device, in
  float32 and bfloat16. It reports the match rate: bfloat16 kernels for a
  batch of positions and for one position may round differently, so a
  verification of k drafts may see a near-tie the other way round.

    python -m dsi.tools.experiments.gpu build results/gpu/models --size gpu --device cuda:0
    python -m dsi.tools.experiments.gpu measure results/gpu/models --device cuda:0 --out results/gpu/gpu.toml
    python -m dsi.tools.experiments.gpu lossless results/gpu/models --device cuda:0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = {
    # Llama-3.2-3B's shape (3.2B parameters, tied embeddings)
    "gpu": dict(
        vocab_size=128_256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    # Llama-3-8B's shape (8.0B parameters)
    "gpu-8b": dict(
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
DRAFTERS = {
    # 78M parameters (66M of them the tied 128k x 512 embeddings)
    "gpu": dict(
        vocab_size=128_256,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
}
DRAFTERS["gpu-8b"] = DRAFTERS["gpu"]


def build(root: Path, size: str, device: str, seed: int = 0) -> dict[str, Path]:
    """Random weights from a config, initialised on ``device``, saved in
    bfloat16 (float32 for ``tiny``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    out = {}
    for name, shapes in (("target", TARGETS[size]), ("drafter", DRAFTERS[size])):
        torch.manual_seed(seed + (name == "drafter"))
        cfg = LlamaConfig(
            max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None, **shapes
        )
        start = time.perf_counter()
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        path = root / name
        model.save_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f}M parameters, {path} ({time.perf_counter() - start:.0f} s)", flush=True)
        out[name] = path
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


# --- measure ------------------------------------------------------------------------------------


def _sync(core: Any) -> None:
    if core.device.type == "cuda":
        core.torch.cuda.synchronize(core.device)


def latencies(path: Path, device: str, dtype: str, prompt_len: int = 128, steps: int = 24, k: int = 5) -> dict:
    """TTFT, TPOT and the cost of a verification of ``k`` drafts (ms, medians)."""
    from dsi.backends.hf import HFCore

    core = HFCore(str(path), device, dtype)
    vocab = core.vocab_size
    prompt = [(i * 7919) % vocab for i in range(prompt_len)]
    ttft, tpot, verify = [], [], []
    for rep in range(4):
        state = core.new_state()
        _sync(core)
        t0 = time.perf_counter()
        core.forward_sync(state, [rep, *prompt], 1)
        _sync(core)
        ttft.append(time.perf_counter() - t0)
        seq = [rep, *prompt]
        for i in range(steps):
            seq.append((i * 31) % vocab)
            t0 = time.perf_counter()
            core.forward_sync(state, seq, 1)
            _sync(core)
            tpot.append(time.perf_counter() - t0)
        for i in range(4):
            t0 = time.perf_counter()
            core.forward_sync(state, [*seq, *((i + j) % vocab for j in range(k))], k + 1)
            _sync(core)
            verify.append(time.perf_counter() - t0)
    out = {
        "ttft_ms": 1e3 * statistics.median(ttft[1:]),  # the first includes warm-up (kernels, allocator)
        "tpot_ms": 1e3 * statistics.median(tpot[steps:]),
        "verify_ms": 1e3 * statistics.median(verify[4:]),
        "k": k,
        "parameters": core.info.num_parameters,
        "vocab": vocab,
        "dtype": core.info.dtype,
        "device": str(core.device),
    }
    out["verify_token_ms"] = max(0.0, (out["verify_ms"] - out["tpot_ms"]) / k)
    return out


def experiment_toml(models: Path, device: str, t: dict, d: dict, replicas: int, acceptance: float) -> str:
    vocab = t["vocab"]
    synth_t = (
        f"synthetic:vocab={vocab},seed=1,ttft_ms={t['ttft_ms']:.3f},tpot_ms={t['tpot_ms']:.3f},"
        f"verify_token_ms={t['verify_token_ms']:.4f}"
    )
    synth_d = (
        f"synthetic:vocab={vocab},seed=1,ttft_ms={d['ttft_ms']:.3f},tpot_ms={d['tpot_ms']:.3f},acceptance={acceptance}"
    )
    target, drafter = (models / "target").resolve(), (models / "drafter").resolve()
    return f"""# Written by python -m dsi.tools.experiments.gpu measure (tools/gpu_bench.sh).
# Measured on {t["device"]}, {t["dtype"]}: target {t["parameters"] / 1e9:.2f}B parameters,
# TTFT {t["ttft_ms"]:.2f} ms, TPOT {t["tpot_ms"]:.2f} ms, {t["k"]} drafts verified in {t["verify_ms"]:.2f} ms;
# drafter {d["parameters"] / 1e6:.0f}M parameters, TTFT {d["ttft_ms"]:.2f} ms, TPOT {d["tpot_ms"]:.2f} ms.
name = "gpu"
description = "random-weight Llama target and drafter measured on one GPU; the same latencies as synthetic replicas"

[run]
tokens = 64
repeats = 2
prompts = 2
prompt_len = 16
lookahead = 5

# The HF models in float32: every strategy must then give the same tokens ("same tokens" checks
# losslessness through the services); in bfloat16 a verification of several positions and a one-token
# step round near-ties differently (the lossless step reports that match rate).
[[profile]]
name = "hf-{t["device"]}"
source = "random-weight models built by python -m dsi.tools.experiments.gpu build, in float32"
targets = [{{ model = "{target}", device = "{device}", dtype = "float32", count = 1 }}]
drafters = [{{ model = "{drafter}", device = "{device}", dtype = "float32" }}]

[[profile]]
name = "measured-x{replicas}"
source = "measured TTFT/TPOT, {replicas} target replicas (as on {replicas} GPUs); acceptance {acceptance}: estimate"
targets = [{{ model = "{synth_t}", count = {replicas} }}]
drafters = [{{ model = "{synth_d}" }}]
"""


# --- lossless -----------------------------------------------------------------------------------


async def _generate(engine: Any, prompt: list[int], params: Any) -> list[int]:
    gen = engine.generate(prompt, params)
    out: list[int] = []
    async for toks in gen.tokens():
        out.extend(toks)
    return out


def _reference(path: Path, device: str, dtype: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True)
    model.to(device).eval()
    refs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        # The mask is explicit: without one, generate() takes every pad_token_id in the prompt for
        # padding and masks it out (these prompts hold token 0, and the models have no pad token).
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
        refs.append(out[0, len(prompt) :].tolist())
    del model
    return refs


async def lossless(models: Path, device: str, dtypes: list[str], tokens: int, n_prompts: int) -> list[dict]:
    from dsi.backends.base import LocalDrafter, LocalTarget
    from dsi.backends.hf import HFDrafter, HFTarget
    from dsi.domain.types import TreeShape
    from services.coordinator.engine import Engine, GenerationParams, Strategy

    rows = []
    for dtype in dtypes:
        targets = [LocalTarget(HFTarget(str(models / "target"), device, dtype)) for _ in range(2)]
        info = targets[0].model.info
        prompts = [[(p * 101 + i * 7) % info.vocab_size for i in range(12 + p)] for p in range(n_prompts)]
        refs = _reference(models / "target", device, dtype, prompts, tokens)
        drafters = {
            "drafter": LocalDrafter(HFDrafter(str(models / "drafter"), device, dtype)),
            "self": LocalDrafter(HFDrafter(str(models / "target"), device, dtype)),
        }
        for dname, drafter in drafters.items():
            engine = Engine(
                targets, [drafter], eos_token_ids=(), max_context=info.max_context_tokens, vocab_size=info.vocab_size
            )
            cases = [(s, TreeShape.parse("chain")) for s in Strategy] + [
                (s, TreeShape.parse("2x2")) for s in (Strategy.SI, Strategy.DSI)
            ]
            for strategy, tree in cases:
                if strategy is Strategy.NONSI and dname == "self":
                    continue  # non-SI uses no drafter
                equal, matched = 0, []
                for prompt, ref in zip(prompts, refs, strict=True):
                    params = GenerationParams(tokens, strategy=strategy, lookahead=5, tree=tree)
                    out = await _generate(engine, prompt, params)
                    equal += out == ref
                    first = next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), len(ref))
                    matched.append(first / len(ref))
                row = {
                    "dtype": info.dtype,
                    "device": info.device,
                    "drafter": dname,
                    "strategy": strategy.value,
                    "tree": "chain" if tree.is_chain else f"{tree.width}x{tree.depth}",
                    "identical": f"{equal}/{len(prompts)}",
                    "match_rate": equal / len(prompts),
                    "tokens_before_divergence": statistics.mean(matched),
                }
                rows.append(row)
                print(
                    f"{row['dtype']:<9} {dname:<8} {row['strategy']:<6} {row['tree']:<6} identical {row['identical']},"
                    f" {100 * row['tokens_before_divergence']:.1f}% of tokens before the first divergence",
                    flush=True,
                )
        del targets, drafters
        _empty_cache()
    return rows


def _empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsi.tools.experiments.gpu", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir", type=Path)
    b.add_argument("--size", choices=sorted(TARGETS), default="gpu")
    b.add_argument("--device", default="cuda:0")
    m = sub.add_parser("measure")
    m.add_argument("dir", type=Path)
    m.add_argument("--device", default="cuda:0")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--replicas", type=int, default=4, help="target replicas of the synthetic profile")
    m.add_argument("--acceptance", type=float, default=0.7, help="the synthetic profile's acceptance (an estimate)")
    m.add_argument("--out", type=Path, required=True, help="experiment file to write")
    m.add_argument("--json", type=Path)
    s = sub.add_parser("lossless")
    s.add_argument("dir", type=Path)
    s.add_argument("--device", default="cuda:0")
    s.add_argument("--dtypes", default="float32,bfloat16")
    s.add_argument("--tokens", type=int, default=32)
    s.add_argument("--prompts", type=int, default=2)
    s.add_argument("--json", type=Path)
    s.add_argument("--strict", default="float32", help="dtypes that must match exactly (exit 1 otherwise)")
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.dir, args.size, args.device)
        return 0
    if args.cmd == "measure":
        t = latencies(args.dir / "target", args.device, args.dtype)
        _empty_cache()
        d = latencies(args.dir / "drafter", args.device, args.dtype)
        for name, r in (("target", t), ("drafter", d)):
            print(
                f"{name}: {r['parameters'] / 1e6:.2f}M parameters, {r['device']} {r['dtype']}:"
                f" TTFT {r['ttft_ms']:.2f} ms, TPOT {r['tpot_ms']:.2f} ms,"
                f" {r['k']} drafts verified in {r['verify_ms']:.2f} ms",
                flush=True,
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(experiment_toml(args.dir, args.device, t, d, args.replicas, args.acceptance))
        if args.json:
            args.json.write_text(json.dumps({"target": t, "drafter": d}, indent=2))
        print(f"wrote {args.out}")
        return 0
    rows = asyncio.run(lossless(args.dir, args.device, args.dtypes.split(","), args.tokens, args.prompts))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    strict = {t for t in args.strict.split(",") if t}
    bad = [r for r in rows if r["dtype"] in strict and r["match_rate"] < 1.0]
    if bad:
        print(f"NOT LOSSLESS in {', '.join(sorted(strict))}: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
