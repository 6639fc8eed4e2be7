"""``dsi bench --load N,N``: throughput and latency under load.

N concurrent clients, closed-loop: each runs ``--load-generations``
generations back to back (a new one as soon as its last one ends). Every
point (strategy x concurrency x batched or not) gets fresh target replicas
and a fresh drafter, in process, over the engine itself. A synthetic cluster
runs on a virtual clock (:mod:`dsi.tools.experiments.virtual_time`), so
its latencies are the cost model's exactly and 64 "GPUs"' worth of work
costs no waiting; a Hugging Face pair runs in real time on its device.

Per point: total throughput (new tokens / makespan), per-token latency of a
generation (``(end - first token) / (tokens - 1)``) and time to first token,
p50 and p99 over generations. "batched" = targets and drafter with
``--max-batch`` = ``--load-batch``; "unbatched" = one request per pass.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsi.backends import BatchLimits, LocalDrafter, LocalTarget, is_synthetic, load_drafter_model, load_target_model
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy

GPU_LIKE_TARGET = "synthetic:vocab=32000,seed=1,ttft_ms=40,tpot_ms=30,batch_slope=0.05"
GPU_LIKE_DRAFTER = "synthetic:vocab=32000,seed=1,ttft_ms=3,tpot_ms=2,acceptance=0.7,batch_slope=0.05"


@dataclass(frozen=True)
class LoadPoint:
    strategy: str
    concurrency: int
    batched: bool
    generations: int
    tokens: int
    seconds: float
    tokens_per_s: float
    token_ms_p50: float
    token_ms_p99: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    target_passes: int
    batched_requests: int


@dataclass(frozen=True)
class LoadSetup:
    target: str
    drafter: str
    replicas: int
    tokens: int
    generations: int
    lookahead: int
    prompt_len: int
    max_batch: int
    device: str = "cpu"
    dtype: str = "auto"


class _Models:
    """Models loaded once per run (Hugging Face weights are shared by every
    point's replicas; the synthetic ones are cheap)."""

    def __init__(self, setup: LoadSetup) -> None:
        self.setup = setup
        self._target: Any = None
        self._drafter: Any = None

    def target(self) -> Any:
        s = self.setup
        if is_synthetic(s.target):
            return load_target_model(s.target)
        self._target = self._target or load_target_model(s.target, s.device, s.dtype)
        return self._target

    def drafter(self) -> Any:
        s = self.setup
        if is_synthetic(s.drafter):
            return load_drafter_model(s.drafter)
        self._drafter = self._drafter or load_drafter_model(s.drafter, s.device, s.dtype)
        return self._drafter


async def run_point(models: _Models, strategy: Strategy, concurrency: int, batched: bool) -> LoadPoint:
    setup = models.setup
    limits = BatchLimits(max_batch=setup.max_batch if batched else 1)
    targets = [LocalTarget(models.target(), batch=limits) for _ in range(setup.replicas)]
    drafter = LocalDrafter(models.drafter(), batch=limits)
    info = targets[0].model.info
    engine = Engine(
        targets, [drafter], eos_token_ids=(), max_context=info.max_context_tokens, vocab_size=info.vocab_size
    )
    loop = asyncio.get_running_loop()
    rng = random.Random(concurrency)
    token_ms: list[float] = []
    ttft_ms: list[float] = []
    total = 0

    async def client(c: int) -> None:
        nonlocal total
        for g in range(setup.generations):
            prompt = [rng.randrange(info.vocab_size) for _ in range(setup.prompt_len)]
            params = GenerationParams(setup.tokens, strategy=strategy, lookahead=setup.lookahead, seed=c * 1000 + g)
            start = loop.time()
            first = 0.0
            n = 0
            async for toks in engine.generate(prompt, params).tokens():
                if not n:
                    first = loop.time()
                n += len(toks)
            end = loop.time()
            total += n
            ttft_ms.append((first - start) * 1000)
            token_ms.append((end - first) * 1000 / max(1, n - 1))

    start = loop.time()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    seconds = loop.time() - start
    return LoadPoint(
        strategy.value,
        concurrency,
        batched,
        len(token_ms),
        total,
        seconds,
        total / seconds,
        float(np.percentile(token_ms, 50)),
        float(np.percentile(token_ms, 99)),
        float(np.percentile(ttft_ms, 50)),
        float(np.percentile(ttft_ms, 99)),
        sum(t.device.stats.passes for t in targets),
        sum(t.device.stats.batched_requests for t in targets),
    )


def run_grid(
    setup: LoadSetup, strategies: list[Strategy], levels: list[int], modes: list[bool], progress: bool = True
) -> list[LoadPoint]:
    models = _Models(setup)
    virtual = is_synthetic(setup.target) and is_synthetic(setup.drafter)
    points = []
    for batched in modes:
        for n in levels:
            for strategy in strategies:
                coro = run_point(models, strategy, n, batched)
                point = run_virtual(coro) if virtual else asyncio.run(coro)
                points.append(point)
                if progress:
                    print(_line(point), file=sys.stderr)
    return points


def _line(p: LoadPoint) -> str:
    mode = "batched" if p.batched else "unbatched"
    return (
        f"{p.strategy:6s} {mode:9s} N={p.concurrency:3d}: {p.tokens_per_s:9.1f} tok/s, per-token p50 "
        f"{p.token_ms_p50:7.1f} ms p99 {p.token_ms_p99:7.1f} ms, TTFT p50 {p.ttft_ms_p50:7.1f} ms"
    )


def report_md(setup: LoadSetup, points: list[LoadPoint]) -> str:
    lines = [
        f"target `{setup.target}` x{setup.replicas}, drafter `{setup.drafter}`, {setup.tokens} new tokens,"
        f" {setup.generations} generations per client, lookahead {setup.lookahead}, batched = max batch"
        f" {setup.max_batch}",
        "",
        "| strategy | batched | N | tok/s | per-token p50 ms | p99 ms | TTFT p50 ms | p99 ms | passes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.strategy} | {'yes' if p.batched else 'no'} | {p.concurrency} | {p.tokens_per_s:.1f} |"
            f" {p.token_ms_p50:.1f} | {p.token_ms_p99:.1f} | {p.ttft_ms_p50:.1f} | {p.ttft_ms_p99:.1f} |"
            f" {p.target_passes} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[LoadPoint], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"nonsi": "tab:gray", "si": "tab:blue", "dsi": "tab:red"}
    for (strategy, batched), group in _groups(points).items():
        group.sort(key=lambda p: p.concurrency)
        xs = [p.token_ms_p50 for p in group]
        ys = [p.tokens_per_s for p in group]
        style = "-o" if batched else "--s"
        label = f"{strategy} {'batched' if batched else 'unbatched'}"
        ax.plot(xs, ys, style, color=colors.get(strategy), label=label, alpha=0.9 if batched else 0.6)
        for p in group:
            ax.annotate(str(p.concurrency), (p.token_ms_p50, p.tokens_per_s), fontsize=7, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-token latency, p50 (ms)")
    ax.set_ylabel("throughput (new tokens/s, all generations)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _groups(points: list[LoadPoint]) -> dict[tuple[str, bool], list[LoadPoint]]:
    out: dict[tuple[str, bool], list[LoadPoint]] = {}
    for p in points:
        out.setdefault((p.strategy, p.batched), []).append(p)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load (N concurrent clients, closed-loop)")
    g.add_argument("--load", type=lambda t: [int(x) for x in t.split(",")], metavar="N,N", help="concurrency levels")
    g.add_argument("--load-batch", type=int, default=16, help="--max-batch of the batched runs (default: 16)")
    g.add_argument("--load-generations", type=int, default=4, help="generations per client (default: 4)")
    g.add_argument(
        "--load-modes", default="unbatched,batched", help="unbatched, batched or both (default: %(default)s)"
    )


def main(args: argparse.Namespace) -> int:
    setup = LoadSetup(
        target=args.target_model,
        drafter=args.drafter_model,
        replicas=args.targets,
        tokens=args.tokens or 64,
        generations=args.load_generations,
        lookahead=args.lookahead or 5,
        prompt_len=args.prompt_len or 16,
        max_batch=args.load_batch,
        device=args.device,
        dtype=args.dtype,
    )
    names = (args.strategies or "nonsi,si,dsi").split(",")
    strategies = [Strategy(n) for n in names]
    modes = [m == "batched" for m in args.load_modes.split(",")]
    points = run_grid(setup, strategies, args.load, modes, progress=not args.no_progress)
    out = Path(args.out or "results/bench-load")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "load.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        w.writeheader()
        for p in points:
            w.writerow(asdict(p))
    (out / "load.md").write_text(report_md(setup, points))
    plot(points, out / "load.png", f"{setup.target} x{setup.replicas}\n{setup.drafter}")
    print(report_md(setup, points))
    print(f"written to {out}: load.csv, load.md, load.png", file=sys.stderr)
    return 0
