"""Automatic lookahead against every fixed one, through dsi's engine with
synthetic services, in-process on a virtual clock
(:mod:`dsi.tools.experiments.virtual_time`: latencies are ``asyncio.sleep``
calls that take no real time, so the numbers do not depend on the machine).

Profiles (the default): for each drafter profile and strategy it runs the
same prompts with lookahead 1, 2, 3, 4, 6, 8, 12, 16 and ``auto`` (0), and
prints the mean milliseconds per token and auto's ratio to the best fixed
lookahead. The profiles: a steady drafter of acceptance 0.8, one whose
acceptance alternates between 0.95 and 0.1 in blocks of 48 positions
(``hard_acceptance``), where no fixed lookahead suits the whole text, and a
drafter 100 times faster than the target whose acceptance alternates between
0.99 and 0.5 (where DSI wants long chunks in the easy text), and the 0.95/0.1
drafter at 1 ms with a compute-bound target (3 ms more per draft verified) on
2 replicas (where DSI wants 8 drafts in the easy text and 1 in the hard).

``--grid``: the grid of docs/benchmarks.md section 5 (drafter latency
fraction 0.01-1 x acceptance 0.01-0.99, 6 x 6; target 20 ms per step, 4
replicas, 64 tokens), auto against lookahead 1, 2, 3, 5, 8 in every cell, for
SI and DSI; ``--json FILE`` keeps every number.

    python tools/lookahead_bench.py [--tokens 240] [--repeats 3] [--replicas 3] [--cold]
    python tools/lookahead_bench.py --grid [--repeats 8] [--json results/lookahead-grid.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import NamedTuple

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.tools.experiments.simulate import grid_axes
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy

FIXED = (1, 2, 3, 4, 6, 8, 12, 16)


class Profile(NamedTuple):
    keys: str  # the drafter's synthetic keys
    drafter_ms: float | None = None  # its ms per token (None: ``--drafter-ms``)
    verify_token_ms: float | None = None  # the target's ms per draft verified (None: ``--verify-token-ms``)
    replicas: int | None = None  # (None: ``--replicas``)


PROFILES: dict[str, Profile] = {
    "steady a=0.8": Profile("acceptance=0.8"),
    "changing a=0.95/0.1": Profile("acceptance=0.95,hard_acceptance=0.1,block=48"),
    # A drafter at 1% of the target's step: where DSI's lookahead matters (long chunks in easy text).
    "changing a=0.99/0.5, 0.3 ms drafter": Profile("acceptance=0.99,hard_acceptance=0.5,block=48", 0.3),
    # A compute-bound target (each draft verified costs 10% of a pass) on 2 replicas: DSI's best lookahead is
    # 8 in the easy text and 1 in the hard (a longer chunk holds a replica on a pass a rejection makes stale).
    "changing a=0.95/0.1, 1 ms drafter, 3 ms per draft verified, 2 replicas": Profile(
        "acceptance=0.95,hard_acceptance=0.1,block=48", 1.0, 3.0, 2
    ),
}
#: The section-5 grid's fixed lookaheads (what `dsi bench --grid` chooses from).
GRID_FIXED = (1, 2, 3, 5, 8)


#: Whether each generation runs on services of its own (``--cold``); otherwise one set of services
#: serves a warm-up generation and then every measured one, as a server does.
COLD = False


def _engine(target: str, drafter: str, replicas: int) -> Engine:
    targets = [LocalTarget(load_target_model(target)) for _ in range(replicas)]
    return Engine(
        targets,
        [LocalDrafter(load_drafter_model(drafter))],
        max_context=8192,
        vocab_size=targets[0].model.info.vocab_size,
    )


async def ms_per_token(
    target: str, drafter: str, replicas: int, strategy: Strategy, k: int, tokens: int, repeats: int
) -> float:
    """Mean virtual milliseconds per token of ``repeats`` generations (prompt ``r + 1, 2, 3``)."""
    times = []
    engine = _engine(target, drafter, replicas)
    if not COLD:  # warm-up: a generation of another prompt, not counted
        async for _ in engine.generate([0, 2, 3], GenerationParams(tokens, strategy=strategy, lookahead=k)).tokens():
            pass
    for r in range(repeats):
        if COLD:
            engine = _engine(target, drafter, replicas)
        gen = engine.generate([r + 1, 2, 3], GenerationParams(tokens, strategy=strategy, lookahead=k))
        loop = asyncio.get_running_loop()
        start = loop.time()
        async for _ in gen.tokens():
            pass
        times.append((loop.time() - start) * 1000 / tokens)
    return statistics.mean(times)


async def profiles(args: argparse.Namespace) -> None:
    print(
        f"target {args.target_ms} ms/pass (+ {args.verify_token_ms} ms per draft) x {args.replicas} replicas, "
        f"drafter {args.drafter_ms} ms/token, {args.tokens} tokens x {args.repeats} (unless the profile says)"
    )
    print("| drafter | strategy | " + " | ".join(f"k={k}" for k in FIXED) + " | auto | auto / best fixed |")
    print("|---|---|" + "---|" * (len(FIXED) + 2))
    for name, prof in PROFILES.items():
        target = f"synthetic:vocab=1000,seed=4,ttft_ms={args.target_ms},tpot_ms={args.target_ms}"
        target += f",verify_token_ms={args.verify_token_ms if prof.verify_token_ms is None else prof.verify_token_ms}"
        drafter = f"synthetic:vocab=1000,seed=4,tpot_ms={prof.drafter_ms or args.drafter_ms},{prof.keys}"
        for strategy in (Strategy.SI, Strategy.DSI):
            run = (target, drafter, prof.replicas or args.replicas, strategy)
            fixed = [await ms_per_token(*run, k, args.tokens, args.repeats) for k in FIXED]
            auto = await ms_per_token(*run, 0, args.tokens, args.repeats)
            cells = " | ".join(f"{v:.2f}" for v in fixed)
            print(f"| {name} | {strategy.value} | {cells} | {auto:.2f} | {auto / min(fixed):.3f} |", flush=True)


async def grid(args: argparse.Namespace) -> list[dict]:
    target_ms, tokens, replicas = 20.0, 64, 4
    target = f"synthetic:vocab=32000,seed=1,ttft_ms={target_ms},tpot_ms={target_ms}"
    fracs, accs = grid_axes(6, 6)
    print(f"target {target_ms} ms/pass x {replicas} replicas, {tokens} tokens x {args.repeats} prompts")
    head = "| drafter fraction | acceptance | SI best fixed (k) | SI auto / best | DSI best fixed (k) | DSI auto / best"
    head += " |"
    print(head)
    print("|---|---|---|---|---|---|")
    rows = []
    for a in accs:
        for f in fracs:
            d = round(float(f) * target_ms, 4)
            drafter = f"synthetic:vocab=32000,seed=1,ttft_ms={d},tpot_ms={d},acceptance={round(float(a), 4)}"
            row: dict = {"drafter_fraction": round(float(f), 4), "acceptance": round(float(a), 4)}
            cells = []
            for strategy in (Strategy.SI, Strategy.DSI):
                run = (target, drafter, replicas, strategy)
                fixed = {k: await ms_per_token(*run, k, tokens, args.repeats) for k in GRID_FIXED}
                auto = await ms_per_token(*run, 0, tokens, args.repeats)
                best = min(fixed, key=fixed.__getitem__)
                ratio = auto / fixed[best]
                row[strategy.value] = {"fixed": fixed, "auto": auto, "ratio": ratio}
                cells += [f"{fixed[best]:.2f} ({best})", f"{ratio:.3f}"]
            rows.append(row)
            print(f"| {row['drafter_fraction']} | {row['acceptance']} | " + " | ".join(cells) + " |", flush=True)
    for s in ("si", "dsi"):
        ratios = [r[s]["ratio"] for r in rows]
        print(
            f"{s}: auto / best fixed over {len(ratios)} cells: max {max(ratios):.3f}, median "
            f"{statistics.median(ratios):.3f}, cells above 1.05: {sum(x > 1.05 for x in ratios)}"
        )
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", action="store_true", help="the section-5 grid instead of the two profiles")
    p.add_argument("--json", help="with --grid: write every number to this file")
    p.add_argument("--cold", action="store_true", help="new services for every generation (no warm-up)")
    p.add_argument("--tokens", type=int, default=240)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--target-ms", type=float, default=30.0)
    p.add_argument("--drafter-ms", type=float, default=3.0)
    p.add_argument(
        "--verify-token-ms",
        type=float,
        default=0.0,
        help="the target's cost per draft verified (a compute-bound target, e.g. on a CPU; default: none)",
    )
    a = p.parse_args()
    COLD = a.cold
    if not a.grid:
        run_virtual(profiles(a))
    else:
        rows = run_virtual(grid(a))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(rows, indent=1))
