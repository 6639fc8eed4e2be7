"""Draft requests with and without context prefixes, at long contexts.

Serves a synthetic drafter (no drafting time) on loopback and plays SI-like
rounds of one session against it: each round asks for ``k`` drafts of the
context so far, then the context grows by some of them and a token of the
"target's". With prefixes (the default since drafters announce
``accepts_context_prefix``) a round's request carries only the tokens past
the last context the session received; without (the client forgets what it
sent before each round) it carries the whole context. The two alternate in
blocks; it prints the median milliseconds per round of each block and the
request's size on the wire.

    python tools/prefix_bench.py [--context 4000] [--rounds 60] [--blocks 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from dsi.backends import LocalDrafter, load_drafter_model
from dsi.domain.types import DraftRequest
from dsi.serving.server import start_server
from dsi.wire import convert
from dsi.wire.transport import GrpcDrafter
from services.drafter.service import DrafterServicer, register_servicer

DRAFTER = "synthetic:vocab=32000,seed=1,tpot_ms=0,acceptance=0.8,max_context=16384"


async def block(client: GrpcDrafter, session: str, context: int, rounds: int, k: int, prefixes: bool) -> list[float]:
    """Milliseconds of each round of one session (the first few warm it up)."""
    ctx = list(range(1, context + 1))
    times = []
    for _ in range(rounds):
        if not prefixes and client.sent is not None:
            client.sent.forget(session)
        start = time.perf_counter()
        drafted = [t.token_id async for chunk in client.draft(DraftRequest(session, ctx, k, k)) for t in chunk.tokens]
        times.append((time.perf_counter() - start) * 1000)
        ctx = [*ctx, *drafted[: k - 1], 7]
    return times[5:]


def request_bytes(context: int, k: int) -> tuple[int, int]:
    """Wire size of a round's request: with a prefix (``k`` new tokens), and in full."""
    full = DraftRequest("s", list(range(1, context + 1)), k, k)
    prefixed = DraftRequest("s", list(range(k)), k, k, prefix_length=context, prefix_hash=2**63)
    return convert.draft_request_to_pb(prefixed).ByteSize(), convert.draft_request_to_pb(full).ByteSize()


async def main(args: argparse.Namespace) -> None:
    local = LocalDrafter(load_drafter_model(DRAFTER))
    running = await start_server(register_servicer(DrafterServicer(local)), "127.0.0.1", 0)
    client = GrpcDrafter(running.address, timeout=30)
    try:
        await client.info()
        medians: dict[bool, list[float]] = {True: [], False: []}
        for b in range(args.blocks):
            for prefixes in (True, False):
                times = await block(client, f"b{b}-{prefixes}", args.context, args.rounds, args.k, prefixes)
                medians[prefixes].append(statistics.median(times))
        with_prefix, full = request_bytes(args.context, args.k)
        print(f"context {args.context} tokens, {args.k} drafts per round, {args.rounds} rounds per block")
        for prefixes, name, size in ((True, "prefix", with_prefix), (False, "full context", full)):
            ms = medians[prefixes]
            print(
                f"{name:>12}: {statistics.median(ms):.2f} ms per round (block medians "
                f"{', '.join(f'{m:.2f}' for m in ms)}); request {size} bytes"
            )
        print(f"prefix requests {client.prefix_requests}, refused {client.prefix_misses}")
    finally:
        await client.close()
        await running.stop(0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=4000, help="tokens of context at the first round")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--blocks", type=int, default=6, help="blocks of rounds of each kind, alternating")
    p.add_argument("--k", type=int, default=3, help="drafts per round")
    asyncio.run(main(p.parse_args()))
