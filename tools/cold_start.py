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

``--grpc`` times what every hop does, a grpc.aio stream write (a server in
this process on 127.0.0.1 echoes each message): the write's wall time and the
CPU its thread spends in it, back to back and after 2 and 20 ms idle.

    python tools/cold_start.py [--rounds 80] [--grpc]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def _raw(b: bytes) -> bytes:
    return b


async def grpc_writes(messages: int, gaps: tuple[float, ...] = (0.0, 0.002, 0.020)) -> dict[float, tuple[float, float]]:
    """Per gap (seconds idle before each write): the median wall and thread-CPU
    microseconds of a stream write, over ``messages`` writes after 20 unmeasured."""
    import grpc

    async def echo(requests: Any, context: Any) -> Any:
        async for message in requests:
            yield message

    handler = grpc.method_handlers_generic_handler(
        "cold.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo, _raw, _raw)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: dict[float, tuple[float, float]] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/cold.Echo/Echo", request_serializer=_raw, response_deserializer=_raw)()
            for gap in gaps:
                wall: list[float] = []
                cpu: list[float] = []
                for i in range(20 + messages):
                    if gap:
                        await asyncio.sleep(gap)
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    await call.write(b"x" * 40)
                    if i >= 20:
                        wall.append((time.perf_counter() - start) * 1e6)
                        cpu.append((time.thread_time() - start_cpu) * 1e6)
                    await call.read()
                out[gap] = statistics.median(wall), statistics.median(cpu)
            await call.done_writing()
    finally:
        await server.stop(None)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=80)
    p.add_argument("--grpc", action="store_true", help="also time grpc.aio stream writes after each gap")
    args = p.parse_args(argv)
    for name, xs in measure(args.rounds).items():
        xs.sort()
        p10, p90 = xs[len(xs) // 10], xs[9 * len(xs) // 10]
        print(f"{name:14s} median {statistics.median(xs):6.0f} us  [p10 {p10:5.0f}, p90 {p90:5.0f}]")
    if args.grpc:
        for gap, (wall, cpu) in asyncio.run(grpc_writes(5 * args.rounds)).items():
            print(f"grpc write after {gap * 1000:4.0f} ms idle: {wall:5.0f} us wall, {cpu:5.0f} us of its thread's CPU")


if __name__ == "__main__":
    main()
