"""The automatic lookahead's choice against the event simulator's best
fixed lookahead, cell by cell.

``--lookahead auto`` chooses from a closed form of the engine's rules
(services/coordinator/engine/lookahead.py); ``dsi simulate`` plays the same
rules event by event. For every drafter latency x acceptance x replica count
this takes the planner's choice when the acceptance is known
(``best_lookahead``) and the simulator's mean latency at every lookahead
1..16 on the same draws (target 30 ms per step, links of 1 µs), and prints
how much slower the choice is than the simulator's best. It measures the
closed form, not the acceptance estimate or the timing: those are
``tools/lookahead_bench.py``'s.

    python tools/lookahead_vs_simulator.py [--strategy dsi] [--tokens 300] [--draws 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from dsi.tools.experiments.simulate import TIE_LINK_MS, Node, SimConfig, draw_coins, simulate_one
from services.coordinator.engine.lookahead import best_lookahead

TARGET_MS = 30.0
DRAFTER_MS = (0.3, 1.0, 3.0, 6.0, 12.0)
ACCEPTANCES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
REPLICAS = (2, 3, 4, 6)
LOOKAHEADS = tuple(range(1, 17))


@dataclass(frozen=True)
class Cell:
    strategy: str
    drafter_ms: float
    acceptance: float
    replicas: int
    chosen: int  # the planner's lookahead
    best: int  # the simulator's fastest
    ms_per_token: tuple[float, ...]  # the simulator's, at lookahead 1, 2, ...

    @property
    def ratio(self) -> float:
        """The choice's latency over the best one's (1: the planner chose the best)."""
        return self.ms_per_token[self.chosen - 1] / min(self.ms_per_token)


def compare(strategy: str, drafter_ms: float, acceptance: float, replicas: int, tokens: int, draws: int) -> Cell:
    targets, drafter = tuple([Node(TARGET_MS, TARGET_MS)] * replicas), Node(drafter_ms, drafter_ms)
    base = SimConfig(targets, drafter, acceptance, 1, tokens).with_links(TIE_LINK_MS)
    rng = np.random.default_rng(1)
    coins = [draw_coins(acceptance, tokens + 64, rng) for _ in range(draws)]
    ms = []
    for k in LOOKAHEADS:
        cfg = replace(base, lookahead=k)
        ms.append(statistics.mean(simulate_one(cfg, c, [strategy])[strategy].latency_ms for c in coins) / tokens)
    dsi, largest = strategy == "dsi", LOOKAHEADS[-1]
    chosen = best_lookahead(dsi, acceptance, drafter_ms / 1000, TARGET_MS / 1000, replicas, largest)
    return Cell(strategy, drafter_ms, acceptance, replicas, chosen, int(np.argmin(ms)) + 1, tuple(ms))


def _compare(args: tuple) -> Cell:
    return compare(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=("si", "dsi"), default="dsi")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--draws", type=int, default=12, help="accept/reject draws per cell (the same at every lookahead)")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    grid = [
        (a.strategy, d, acc, n, a.tokens, a.draws) for d, acc, n in itertools.product(DRAFTER_MS, ACCEPTANCES, REPLICAS)
    ]
    with ProcessPoolExecutor(a.workers) as pool:
        cells = list(pool.map(_compare, grid))
    print(f"{a.strategy}: target {TARGET_MS} ms, {a.tokens} tokens x {a.draws} draws; chosen / best: ratio")
    print("| drafter ms | acceptance | " + " | ".join(f"{n} replicas" for n in REPLICAS) + " |")
    print("|---|---|" + "---|" * len(REPLICAS))
    for d, acc in itertools.product(DRAFTER_MS, ACCEPTANCES):
        row = [c for c in cells if c.drafter_ms == d and c.acceptance == acc]
        print(f"| {d} | {acc} | " + " | ".join(f"{c.chosen} / {c.best}: {c.ratio:.3f}" for c in row) + " |")
    ratios = [c.ratio for c in cells]
    print(
        f"{len(cells)} cells: mean {statistics.mean(ratios):.4f}, max {max(ratios):.3f}, "
        f"above 1.02: {sum(r > 1.02 for r in ratios)}, above 1.05: {sum(r > 1.05 for r in ratios)}"
    )


if __name__ == "__main__":
    main()
