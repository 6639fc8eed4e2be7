"""Fault soak: minutes of concurrent streams with random cancellations while
target replicas are killed and restarted, through the real processes.

    python -m dsi.tools.experiments.soak [--minutes 3] [--clients 16] [--restart-every 5] [--json FILE]

Starts ``--targets`` synthetic target replicas, a drafter and a coordinator on
loopback. ``--clients`` clients each loop: a generation of a random strategy,
length and prompt (greedy or seeded sampling), cancelled at a random moment one
time in five. Every ``--restart-every`` seconds one replica, in turn, is killed
(SIGKILL) and started again on its address a second later. At the end it
reports requests done, cancelled, failed (an error status: a *lost* request)
and wrong (a greedy or seeded output that differs from the one computed before
the soak, when nothing failed), the failovers the coordinator made, the
sessions the services still hold once every client is done (leaks), and each
service's RSS at the start and the end. Numbers in docs/benchmarks.md ("Fault
soak"). Linux (``/proc`` for RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dsi.tools.experiments.procs import Service, rss_kib, spawn
from dsi.v1 import (
    drafter_pb2,
    drafter_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)

TARGET = "synthetic:vocab=1000,seed=3,tpot_ms=10"
DRAFTER = "synthetic:vocab=1000,seed=3,tpot_ms=1,acceptance=0.7"
STRATEGIES = (generation_pb2.STRATEGY_NONSI, generation_pb2.STRATEGY_SI, generation_pb2.STRATEGY_DSI)
PROMPTS = [[1, 2, 3, i] for i in range(8)]
MAX_TOKENS = 120


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    failovers: int = 0
    drafter_failures: int = 0
    tokens: int = 0


def _request(prompt: list[int], tokens: int, strategy: int, seed: int | None) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=tokens, strategy=strategy, lookahead=4)
    if seed is not None:
        req.temperature, req.seed = 1.0, seed
    return req


async def _generate(stub: generation_pb2_grpc.GenerationServiceStub, req: generation_pb2.GenerateRequest):
    ids: list[int] = []
    stats = None
    async for msg in stub.Generate(req, timeout=120):
        ids += msg.token_ids
        if msg.finish_reason:
            stats = msg.stats
    return ids, stats


async def _client(
    stub: generation_pb2_grpc.GenerationServiceStub,
    refs: dict[tuple[int, int | None], list[int]],
    rng: random.Random,
    until: float,
    tally: Tally,
) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        p = rng.randrange(len(PROMPTS))
        seed = rng.choice([None, 7, 8])
        tokens = rng.randint(10, MAX_TOKENS)
        req = _request(PROMPTS[p], tokens, rng.choice(STRATEGIES), seed)
        task = asyncio.ensure_future(_generate(stub, req))
        if rng.random() < 0.2:
            await asyncio.wait([task], timeout=rng.uniform(0.0, 0.5))
            if not task.done():
                task.cancel()
        try:
            ids, stats = await task
        except asyncio.CancelledError:
            tally.outcomes["cancelled"] += 1
            continue
        except grpc.aio.AioRpcError as exc:
            tally.outcomes["failed"] += 1
            tally.errors[f"{exc.code().name}: {exc.details()}"[:160]] += 1
            continue
        tally.tokens += len(ids)
        tally.failovers += stats.failovers
        tally.drafter_failures += stats.drafter_failures
        tally.outcomes["done" if ids == refs[(p, seed)][:tokens] else "wrong"] += 1


async def _sessions(svc: Service, kind: str) -> int:
    async with grpc.aio.insecure_channel(svc.address) as ch:
        if kind == "target":
            resp = await target_pb2_grpc.TargetServiceStub(ch).Info(target_pb2.TargetServiceInfoRequest(), timeout=5)
        else:
            resp = await drafter_pb2_grpc.DrafterServiceStub(ch).Info(
                drafter_pb2.DrafterServiceInfoRequest(), timeout=5
            )
        return resp.counters.sessions


def _mib(svc: Service) -> float:
    return rss_kib(svc.pid)[0] / 1024


async def soak(args: argparse.Namespace, workdir: Path) -> dict:
    targets = [spawn(workdir, f"target-{i}", ["target", "--model", TARGET]) for i in range(args.targets)]
    drafter = spawn(workdir, "drafter", ["drafter", "--model", DRAFTER])
    argv = ["coordinator", "--drafter", drafter.address, *(a for t in targets for a in ("--target", t.address))]
    coordinator = spawn(workdir, "coordinator", argv)
    services = {"coordinator": coordinator, "drafter": drafter, **{t.name: t for t in targets}}
    try:
        async with grpc.aio.insecure_channel(coordinator.address) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            refs = {}
            for p, prompt in enumerate(PROMPTS):
                for seed in (None, 7, 8):
                    refs[(p, seed)] = (
                        await _generate(stub, _request(prompt, MAX_TOKENS, generation_pb2.STRATEGY_NONSI, seed))
                    )[0]
            rss_start = {name: _mib(svc) for name, svc in services.items()}
            tally = Tally()
            loop = asyncio.get_running_loop()
            until = loop.time() + args.minutes * 60
            rng = random.Random(args.seed)
            clients = [
                asyncio.ensure_future(_client(stub, refs, random.Random(rng.random()), until, tally))
                for _ in range(args.clients)
            ]
            restarts = 0
            started = time.monotonic()
            while loop.time() < until:
                await asyncio.sleep(min(args.restart_every, max(0.0, until - loop.time())))
                if loop.time() >= until:
                    break
                i = restarts % len(targets)
                victim = targets[i]
                victim.popen.send_signal(signal.SIGKILL)
                victim.popen.wait(10)
                await asyncio.sleep(1.0)
                port = int(victim.address.rsplit(":", 1)[1])
                targets[i] = services[victim.name] = await asyncio.to_thread(
                    spawn, workdir, victim.name, ["target", "--model", TARGET], port
                )
                restarts += 1
                elapsed, done = time.monotonic() - started, sum(tally.outcomes.values())
                print(
                    f"[{elapsed:5.0f}s] restarts {restarts}, requests {done}, {dict(tally.outcomes)}", file=sys.stderr
                )
            await asyncio.gather(*clients)
            await asyncio.sleep(1.0)  # sessions are released as generations end
            leaked = {
                name: await _sessions(svc, name.split("-")[0])
                for name, svc in services.items()
                if name != "coordinator"
            }
            rss_end = {name: _mib(svc) for name, svc in services.items()}
    finally:
        for svc in services.values():
            if svc.popen.poll() is None:
                svc.popen.kill()
                svc.popen.wait(10)
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "targets": args.targets,
        "restarts": restarts,
        "requests": dict(tally.outcomes),
        "lost": tally.outcomes["failed"],
        "errors": dict(tally.errors),
        "tokens": tally.tokens,
        "failovers": tally.failovers,
        "drafter_failures": tally.drafter_failures,
        "leaked_sessions": leaked,
        "rss_mib_start": {k: round(v, 1) for k, v in rss_start.items()},
        "rss_mib_end": {k: round(v, 1) for k, v in rss_end.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsi.tools.experiments.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--targets", type=int, default=3)
    p.add_argument("--restart-every", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dsi-soak-") as tmp:
        report = asyncio.run(soak(args, Path(tmp)))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = report["lost"] == 0 and report["requests"].get("wrong", 0) == 0 and not any(report["leaked_sessions"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
