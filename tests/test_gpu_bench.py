"""tools/gpu_bench.sh, the one-GPU script, run end to end on the CPU with
tiny models: every step runs and writes what the next one reads, greedy
output is identical to generate() in float32 for every strategy, decisions
on the device move 8 bytes per position, and dsi bench reports both
profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from dsi.tools.experiments import config as xconfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_script_runs_on_the_cpu_with_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SIZE": "tiny",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "TOKENS": "10",
        "BENCH_ARGS": "--tokens 6 --repeats 1 --prompts 1 --no-calibrate --launch inproc --strategies nonsi,si",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/gpu_bench.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("1. build", "2. TTFT/TPOT", "3. greedy losslessness", "4. decisions", "5. dsi bench", "done"):
        assert f"== {step}" in proc.stdout, step

    lat = json.loads((out / "latencies.json").read_text())
    assert lat["target"]["tpot_ms"] > 0 and lat["drafter"]["tpot_ms"] > 0 and lat["target"]["vocab"] == 512
    exp = xconfig.load(out / "gpu.toml")
    assert [p.name for p in exp.profiles] == ["hf-cpu", "measured-x4"]
    hf = exp.profiles[0].cluster
    assert hf.targets[0].dtype == hf.drafters[0].dtype == "float32"  # so that 'same tokens' checks losslessness
    assert f"tpot_ms={lat['target']['tpot_ms']:.3f}" in exp.profiles[1].cluster.targets[0].model

    rows = json.loads((out / "lossless.json").read_text())
    f32 = [r for r in rows if r["dtype"] == "float32"]
    strategies = {(r["drafter"], r["strategy"], r["tree"]) for r in f32}
    assert ("drafter", "nonsi", "chain") in strategies and ("self", "dsi", "2x2") in strategies and len(f32) == 9
    assert all(r["match_rate"] == 1.0 for r in f32), f32
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}

    decisions = json.loads((out / "decisions.json").read_text())
    greedy = next(r for r in decisions if r["temperature"] == 0)
    assert greedy["device"]["bytes_per_position"] == 8 and greedy["host"]["bytes_per_position"] == 4 * 512

    results = json.loads((out / "bench" / "results.json").read_text())
    points = {(r["point"], r["strategy"]) for r in results["summary"]}
    assert {("hf-cpu", "si"), ("hf-cpu", "hf_generate"), ("measured-x4", "nonsi")} <= points, points
    assert all(r["all_match"] for r in results["summary"] if r["strategy"] in ("nonsi", "si"))


def test_the_lossless_reference_is_greedy_decoding_of_the_whole_prompt(tmp_path: Path) -> None:
    """generate() masks every pad_token_id it finds in a prompt unless given a mask: the reference
    once did that to prompts holding token 0 (on a GPU every strategy then 'differed' from it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsi.tools.experiments import gpu

    paths = gpu.build(tmp_path, "tiny", "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(paths["target"])).eval()
    # Mostly token 0: masked, the model would see one or two tokens of each.
    prompts = [[0] * n + [t] for n, t in ((3, 5), (6, 11), (9, 200), (4, 77))] + [[0, 7, 14, 0, 3, 0]]
    refs = gpu._reference(paths["target"], "cpu", "float32", prompts, tokens=6)
    for prompt, ref in zip(prompts, refs, strict=True):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert ref == seq[len(prompt) :], (prompt, ref, seq[len(prompt) :])
