"""Deciding on the host vs on the model's device, with a large vocabulary.

Builds a random-weight Llama-architecture model from a config (nothing
downloaded; tiny layers, a 128k vocabulary by default), runs the target's
forward pass over a context and 8 drafts, and times the decision alone,
both ways, on the same logits:

- host: the rows of logits go to the host as float32 (a copy off a GPU) and
  dsi.domain.sampling decides them in numpy;
- device: dsi.backends.torch_sampling decides them with torch where they
  are, and only the chosen ids (int64) come to the host.

Prints bytes moved to the host per position and CPU time (process time, all
threads) and wall time per verification, median over the repeats.

    python tools/decision_bench.py                          # CPU, greedy and T=1
    python tools/decision_bench.py --device cuda:0 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_model(root: Path, vocab: int, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    path = root / f"llama-vocab{vocab}"
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def measure(path: Path, device: str, dtype: str, drafts: int, repeats: int, temperature: float) -> dict:
    from dsi.backends.hf import HFTarget
    from dsi.domain.types import DraftToken, SamplingParams, VerifyRequest

    target = HFTarget(str(path), device, dtype, decide_on_device=True)
    core, decisions = target.core, target.decisions
    vocab = target.info.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=temperature)
    out: dict = {"vocab": vocab, "model_device": device, "dtype": target.info.dtype, "drafts": drafts}
    state = core.new_state()
    ctx = rng.integers(0, vocab, size=32).tolist()
    draft_ids = rng.integers(0, vocab, size=drafts).tolist()
    fwd = core.forward_sync(state, [*ctx, *draft_ids], drafts + 1)
    request = VerifyRequest("bench", ctx, [DraftToken(t) for t in draft_ids], params, seed=1)
    results = {}
    for mode in ("host", "device", "host", "device"):  # interleaved, the first round is a warm-up
        decisions.on_device = mode == "device"
        cpu, wall = [], []
        before = decisions.host_bytes
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            got = decisions.verify_sync(request, fwd)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        results.setdefault(mode, []).append(got)
        out[mode] = {
            "bytes_per_position": (decisions.host_bytes - before) / repeats / (drafts + 1),
            "cpu_ms_per_verification": 1e3 * statistics.median(cpu),
            "wall_ms_per_verification": 1e3 * statistics.median(wall),
        }
    assert results["host"][-1] == results["device"][-1], "the two paths must decide the same"
    out["cpu_time_ratio"] = out["host"]["cpu_ms_per_verification"] / max(out["device"]["cpu_ms_per_verification"], 1e-9)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--drafts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--temperature", type=float, action="append", help="default: 0 (greedy) and 1")
    ap.add_argument("--model", help="an existing model directory (default: build one in a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else build_model(Path(tmp), args.vocab, args.hidden, args.layers)
        for t in args.temperature or [0.0, 1.0]:
            r = measure(path, args.device, args.dtype, args.drafts, args.repeats, t)
            r["temperature"] = t
            rows.append(r)
            parts = [
                f"{mode} {r[mode]['bytes_per_position']:.0f} B/position,"
                f" {r[mode]['cpu_ms_per_verification']:.3f} ms CPU,"
                f" {r[mode]['wall_ms_per_verification']:.3f} ms wall"
                for mode in ("host", "device")
            ]
            head = f"T={t:g} vocab={r['vocab']} {r['model_device']} {r['dtype']}, {args.drafts} drafts"
            print(f"{head}: {' | '.join(parts)} | CPU time {r['cpu_time_ratio']:.1f}x less", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
