"""Automatic lookahead against every fixed one, through dsi's engine with
synthetic services, in-process on a virtual clock
(:mod:`dsi.tools.experiments.virtual_time`: latencies are ``asyncio.sleep``
calls that take no real time, so the numbers do not depend on the machine).

For each drafter profile and strategy it runs the same prompts with lookahead
1, 2, 3, 4, 6, 8, 12 and ``auto`` (0), and prints the mean milliseconds per
token and auto's ratio to the best fixed lookahead. The profiles: a steady
drafter of acceptance 0.8 and one whose acceptance alternates between 0.95 and
0.1 in blocks of 48 positions (``hard_acceptance``), where no fixed lookahead
suits the whole text.

    python tools/lookahead_bench.py [--tokens 240] [--repeats 3] [--replicas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.tools.experiments.virtual_time import run_virtual
from services.coordinator.engine import Engine, GenerationParams, Strategy

FIXED = (1, 2, 3, 4, 6, 8, 12)
PROFILES = {
    "steady a=0.8": "acceptance=0.8",
    "changing a=0.95/0.1": "acceptance=0.95,hard_acceptance=0.1,block=48",
}


async def ms_per_token(target: str, drafter: str, replicas: int, strategy: Strategy, k: int, args) -> float:
    times = []
    for r in range(args.repeats):
        targets = [LocalTarget(load_target_model(target)) for _ in range(replicas)]
        engine = Engine(
            targets,
            [LocalDrafter(load_drafter_model(drafter))],
            max_context=8192,
            vocab_size=targets[0].model.info.vocab_size,
        )
        gen = engine.generate([r + 1, 2, 3], GenerationParams(args.tokens, strategy=strategy, lookahead=k))
        loop = asyncio.get_running_loop()
        start = loop.time()
        async for _ in gen.tokens():
            pass
        times.append((loop.time() - start) * 1000 / args.tokens)
    return statistics.mean(times)


async def main(args: argparse.Namespace) -> None:
    target = f"synthetic:vocab=1000,seed=4,tpot_ms={args.target_ms}"
    print(
        f"target {args.target_ms} ms/pass x {args.replicas} replicas, drafter {args.drafter_ms} ms/token, "
        f"{args.tokens} tokens x {args.repeats}"
    )
    print("| drafter | strategy | " + " | ".join(f"k={k}" for k in FIXED) + " | auto | auto / best fixed |")
    print("|---|---|" + "---|" * (len(FIXED) + 2))
    for name, keys in PROFILES.items():
        drafter = f"synthetic:vocab=1000,seed=4,tpot_ms={args.drafter_ms},{keys}"
        for strategy in (Strategy.SI, Strategy.DSI):
            fixed = [await ms_per_token(target, drafter, args.replicas, strategy, k, args) for k in FIXED]
            auto = await ms_per_token(target, drafter, args.replicas, strategy, 0, args)
            cells = " | ".join(f"{v:.1f}" for v in fixed)
            print(f"| {name} | {strategy.value} | {cells} | {auto:.1f} | {auto / min(fixed):.3f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=240)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--target-ms", type=float, default=30.0)
    p.add_argument("--drafter-ms", type=float, default=3.0)
    run_virtual(main(p.parse_args()))
