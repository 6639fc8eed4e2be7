"""How much slower a process's first work after a gap is (docs/benchmarks.md
section 13, "Where an SI round's time goes").

The same small piece of work (two rows of the synthetic model's arithmetic:
hashing, numpy's generator; ~60-100 us when run back to back) is timed right
after each kind of gap, the kinds interleaved in random order:

* ``none``: straight after the previous piece (caches warm);
* ``sleep2`` / ``sleep20``: after ``time.sleep`` of 2 / 20 ms (the process idle,
  as a service waiting for its next message is);
* ``spin20``: after 20 ms of busy-waiting (the process on its CPU all along);
* ``sleep18+spin2``: after sleeping 18 ms and spinning 2.

If the work after a gap is slower whether the process slept or spun, the cost
is not the idle CPU's wake-up but the time itself: the caches the work needs
were taken by whatever else ran on the machine (on a cloud VM: other tenants'
vCPUs on the same cores), and every hop of a generation, each the first work
of a process after a wait, pays it.

    python tools/cold_start.py [--rounds 80]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from dsi.backends.synthetic import PseudoLM


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


GAPS: dict[str, Callable[[], object]] = {
    "none": lambda: None,
    "sleep2": lambda: time.sleep(0.002),
    "sleep20": lambda: time.sleep(0.020),
    "spin20": lambda: spin(0.020),
    "sleep18+spin2": lambda: (time.sleep(0.018), spin(0.002)),
}


def measure(rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Microseconds of the piece of work after each kind of gap, ``rounds`` each."""
    lm = PseudoLM(32000, 1, 8)
    rng = random.Random(seed)
    out: dict[str, list[float]] = {name: [] for name in GAPS}
    position = 0
    for _ in range(rounds):
        for name in rng.sample(list(GAPS), len(GAPS)):
            GAPS[name]()
            position += 1  # new positions: the model's cache never answers
            start = time.perf_counter()
            lm.sparse_row([5, 6, 7, position])
            lm.sparse_row([5, 6, 7, position, 3])
            out[name].append((time.perf_counter() - start) * 1e6)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=80)
    args = p.parse_args(argv)
    for name, xs in measure(args.rounds).items():
        xs.sort()
        p10, p90 = xs[len(xs) // 10], xs[9 * len(xs) // 10]
        print(f"{name:14s} median {statistics.median(xs):6.0f} us  [p10 {p10:5.0f}, p90 {p90:5.0f}]")


if __name__ == "__main__":
    main()
