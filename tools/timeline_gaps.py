"""Where a generation's time goes through the services: its timeline's spans
against the latencies the model gives them (docs/benchmarks.md section 13,
"Writes behind the work; the model's ties").

Starts a cluster of synthetic services (each its own process on loopback, as
``dsi bench`` does), runs a few generations with ``timeline=True`` and prints,
per kind of span, how much longer it took than the model's latency for it:

* a verification, sent to its result (the target's step);
* a draft stream, opened to its first chunk (a drafter step per token);
* chunk to chunk within a draft stream (a drafter step per token);
* a rejection committed to the next draft stream opened (the coordinator).

    python tools/timeline_gaps.py --target-ms 30 --drafter-ms 3 --acceptance 0.8 --lookahead 5
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import statistics

from dsi.domain.timeline import Timeline

SPANS = ("verification", "first_chunk", "next_chunk", "restart")


def gaps(timeline: Timeline, target_ms: float, drafter_ms: float) -> dict[str, list[float]]:
    """Milliseconds each span took beyond the model's latency for it (see the
    module's text); verifications that decided something only (a cancelled
    one's result never comes)."""
    out: dict[str, list[float]] = {name: [] for name in SPANS}
    for v in timeline.verifications:
        if v.completed is not None and v.outcome == "decided":
            out["verification"].append((v.completed - v.sent) * 1000 - target_ms)
    chunks: dict[int, list] = {}
    for c in timeline.draft_chunks:
        chunks.setdefault(c.stream, []).append(c)
    for stream in timeline.draft_streams:
        mine = sorted(chunks.get(stream.id, []), key=lambda c: c.received)
        if mine:
            out["first_chunk"].append((mine[0].received - stream.opened) * 1000 - drafter_ms * mine[0].tokens)
        for a, b in itertools.pairwise(mine):
            out["next_chunk"].append((b.received - a.received) * 1000 - drafter_ms * b.tokens)
    opened = sorted(s.opened for s in timeline.draft_streams)
    for commit in timeline.commits:
        if commit.rejected:
            i = bisect.bisect_left(opened, commit.at)
            if i < len(opened):
                out["restart"].append((opened[i] - commit.at) * 1000)
    return out


def summary(values: list[float]) -> str:
    if not values:
        return "none"
    xs = sorted(values)
    return (
        f"median {statistics.median(xs):+.2f} ms [p10 {xs[len(xs) // 10]:+.2f}, p90 {xs[9 * len(xs) // 10]:+.2f}],"
        f" n = {len(xs)}"
    )


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    from dsi.tools.experiments import cluster, config
    from dsi.wire.client import Client, request

    target = f"synthetic:vocab=32000,seed=1,ttft_ms={args.target_ms:g},tpot_ms={args.target_ms:g}"
    drafter = (
        f"synthetic:vocab=32000,seed=1,ttft_ms={args.drafter_ms:g},tpot_ms={args.drafter_ms:g},"
        f"acceptance={args.acceptance:g}"
    )
    spec = config.Cluster((config.Instance(target),) * args.targets, (config.Instance(drafter),))
    running = await cluster.start(spec)
    found: dict[str, list[float]] = {name: [] for name in SPANS}
    try:
        async with Client(running.address) as client:
            warm = request(prompt_ids=list(range(1, 17)), max_new_tokens=8, strategy=args.strategy)
            await client.generate(warm)
            for p in range(args.generations):
                req = request(
                    prompt_ids=list(range(1 + p, 17 + p)),
                    max_new_tokens=args.tokens,
                    strategy=args.strategy,
                    lookahead=args.lookahead,
                    timeline=True,
                )
                result = await client.generate(req)
                assert result.timeline is not None
                ms = result.timeline.wall_seconds * 1000 / max(1, len(result.token_ids))
                print(f"generation {p}: {ms:.2f} ms per token")
                for name, values in gaps(result.timeline, args.target_ms, args.drafter_ms).items():
                    found[name] += values
    finally:
        await running.close()
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-ms", type=float, default=30.0)
    p.add_argument("--drafter-ms", type=float, default=3.0)
    p.add_argument("--acceptance", type=float, default=0.8)
    p.add_argument("--lookahead", type=int, default=5)
    p.add_argument("--targets", type=int, default=4)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--strategy", default="dsi", choices=("si", "dsi"))
    args = p.parse_args(argv)
    found = asyncio.run(run(args))
    labels = {
        "verification": "verification sent -> result, minus the target's step",
        "first_chunk": "draft stream opened -> first chunk, minus its drafter steps",
        "next_chunk": "chunk -> next chunk, minus its drafter steps",
        "restart": "rejection committed -> next draft stream opened",
    }
    for name in SPANS:
        print(f"{labels[name]}: {summary(found[name])}")


if __name__ == "__main__":
    main()
