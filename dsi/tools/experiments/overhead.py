"""The per-token overhead budget, part by part, through the real services.

With zero-latency synthetic models (a forward pass costs no time), every
millisecond is the system's own. Each service runs as its own process (as
``dsi bench`` and a deployment run them) on loopback:

- ``target_rpc``: client -> target Verify, one call per token, no drafts (a
  frontier step of SI and DSI without drafts), sending only the tokens past
  the session's prefix as the coordinator does; ``target_rpc_full_context``:
  the same, sending the full context every time;
- ``target_decode``: client -> target Decode, one stream per generation, a
  message per token (the coordinator -> target hop alone, as non-SI makes
  it; Verify calls in the ``unary`` variant);
- ``draft_stream``: a draft call, per drafted token (lookahead chunks): a
  call on one DraftStream (a Draft call in the ``unary`` variant);
- ``nonsi`` / ``si`` / ``dsi``: client -> coordinator -> target (-> drafter),
  per token of a generation;
- ``client_coordinator``: ``nonsi - target_decode``, the client -> coordinator
  hop plus the coordinator's own work per token;
- CPU per token of every process (``/proc/PID/stat``; the client is this
  process), so a service's own CPU is its share of the time.

``--profile FILE`` runs the non-SI path once more with every service in this
process (``inproc``) under cProfile and prints where the time goes, by
self time, grouped by package.

    python -m dsi.tools.experiments.overhead --profile prof.out   # ~2 minutes
    dsi bench --overhead [--tokens N --repeats R --prompt-len P]   # the same, without the profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ZERO_TARGET = "synthetic:vocab=32000,seed=1"
ZERO_DRAFTER = "synthetic:vocab=32000,seed=1,acceptance=0.7"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds spent by named processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.spent = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.spent


#: How the coordinator (and the target_rpc and draft_stream clients) send verifications and drafts: over
#: one VerifyStream per replica and one DraftStream per drafter, or as calls (``--no-verify-stream``).
VARIANTS = {"stream": (), "unary": ("--no-verify-stream",)}
PARTS = (
    "target_rpc_full_context",
    "target_rpc",
    "target_decode",
    "draft_stream",
    "client_coordinator",
    "nonsi",
    "si",
    "dsi",
)


async def measure(
    tokens: int,
    prompt_len: int,
    lookahead: int,
    rounds: int,
    log_dir: Path | None,
    variants: tuple[str, ...] = ("stream",),
) -> dict[str, Any]:
    """Each part ``rounds`` times; with several ``variants`` (one cluster of
    processes each, started together), the rounds alternate between them, so
    that a change in the machine's load shows in all of them alike. The first
    variant's parts are at the top level of the result, every variant's under
    ``variants``."""
    from dsi.domain.types import GREEDY, DecodeRequest, DraftRequest, VerifyRequest
    from dsi.tools.experiments import cluster as xcluster
    from dsi.tools.experiments import config as xconfig
    from dsi.tools.experiments.bench import generate_once
    from dsi.wire.client import Client
    from dsi.wire.transport import GrpcDrafter, GrpcTarget

    zero = xconfig.Cluster((xconfig.Instance(ZERO_TARGET),), (xconfig.Instance(ZERO_DRAFTER),))
    prompt = list(range(1, prompt_len + 1))
    session = iter(range(1 << 30))
    out: dict[str, Any] = {"tokens": tokens, "prompt_len": prompt_len, "lookahead": lookahead, "rounds": rounds}
    async with contextlib.AsyncExitStack() as stack:
        parts: dict[str, dict[str, Callable[[], Any]]] = {}
        meters: dict[str, CpuMeter] = {}
        for variant in variants:
            logs = log_dir / variant if log_dir is not None else None
            running = await xcluster.start(zero, "subprocess", logs, coordinator_args=VARIANTS[variant])
            stack.push_async_callback(running.close)
            meters[variant] = CpuMeter({**running.pids, "client": os.getpid()})
            streamed = variant == "stream"
            target = GrpcTarget(running.addresses["target-0"], verify_stream=streamed)
            await target.info()  # as the coordinator does: context prefixes, VerifyStream
            full = GrpcTarget(running.addresses["target-0"], verify_stream=streamed)  # always the full context
            drafter = GrpcDrafter(running.addresses["drafter-0"], draft_stream=streamed)
            await drafter.info()  # as the coordinator does: DraftStream
            client = await stack.enter_async_context(Client(running.address))
            for c in (target, full, drafter):
                stack.push_async_callback(c.close)

            def target_run(c: GrpcTarget) -> Callable[[], Any]:
                async def go() -> None:  # what non-SI asks of the target: one Verify per token
                    sid, ctx = f"ov-{next(session)}", list(prompt)
                    for _ in range(tokens):
                        r = await c.verify(VerifyRequest(sid, list(ctx), [], GREEDY, 1))
                        ctx.append(r.next_token)
                    await c.release_session(sid)

                return go

            def decode_run(c: GrpcTarget) -> Callable[[], Any]:
                async def go() -> None:  # what non-SI asks of the target: a Decode stream (or Verify calls)
                    sid = f"ov-{next(session)}"
                    start = VerifyRequest(sid, list(prompt), [], GREEDY, 1)
                    n = sum([1 async for _ in c.decode(DecodeRequest(start, tokens))])
                    assert n == tokens, n
                    await c.release_session(sid)

                return go

            def draft_run(d: GrpcDrafter) -> Callable[[], Any]:
                async def go() -> None:
                    req = DraftRequest(f"ov-{next(session)}", prompt, lookahead, tokens, sampling=GREEDY, seed=1)
                    n = sum([len(ch.tokens) async for ch in d.draft(req)])
                    assert n == tokens, n
                    await d.release_session(req.session_id)

                return go

            def generation(c: Client, strategy: str) -> Callable[[], Any]:
                async def go() -> None:
                    r = await generate_once(c, prompt, tokens, strategy, lookahead)
                    assert len(r["token_ids"]) == tokens, r

                return go

            parts[variant] = {
                "target_rpc_full_context": target_run(full),
                "target_rpc": target_run(target),
                "target_decode": decode_run(target),
                "draft_stream": draft_run(drafter),
                "nonsi": generation(client, "nonsi"),
                "si": generation(client, "si"),
                "dsi": generation(client, "dsi"),
            }
        for variant in variants:  # warm-up
            for fn in parts[variant].values():
                await fn()
        walls: dict[str, dict[str, list[float]]] = {v: {name: [] for name in parts[v]} for v in variants}
        cpu: dict[str, dict[str, dict[str, float]]] = {v: {} for v in variants}
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                for name, fn in parts[variant].items():
                    meters[variant].start()
                    t0 = time.perf_counter()
                    await fn()
                    walls[variant][name].append(time.perf_counter() - t0)
                    spent = meters[variant].stop()
                    total = cpu[variant].setdefault(name, {})
                    for k, v in spent.items():
                        total[k] = total.get(k, 0.0) + v
        out["variants"] = {}
        for variant in variants:
            res: dict[str, Any] = {}
            for name in parts[variant]:
                res[name] = {
                    "ms_per_token": 1e3 * statistics.median(walls[variant][name]) / tokens,
                    "cpu_ms_per_token": {k: round(1e3 * v / rounds / tokens, 4) for k, v in cpu[variant][name].items()},
                }
            res["client_coordinator"] = {
                "ms_per_token": res["nonsi"]["ms_per_token"] - res["target_decode"]["ms_per_token"]
            }
            out["variants"][variant] = res
        out.update(out["variants"][variants[0]])
    return out


# --- profile ----------------------------------------------------------------------------------------

GROUPS = (
    ("grpc", ("grpc/", "grpc_status", "_cython/")),
    ("protobuf and conversion", ("google/protobuf", "dsi/wire/convert", "_pb2")),
    ("asyncio event loop", ("asyncio/",)),
    ("coordinator engine", ("services/coordinator/",)),
    ("target backend and decision", ("dsi/backends/", "dsi/domain/")),
    ("numpy", ("numpy/",)),
    ("serving (gate, metrics, servers)", ("dsi/serving/", "services/target/", "services/drafter/")),
    ("client and benchmark", ("dsi/wire/client", "dsi/tools/")),
)


def group_of(filename: str) -> str:
    for name, needles in GROUPS:
        if any(n in filename for n in needles):
            return name
    return "other" if filename != "~" else "builtins (C, unattributed)"


async def profile(tokens: int, prompt_len: int, rounds: int, out: Path, top: int = 25) -> dict[str, Any]:
    """Non-SI with every service in this process, under cProfile: self time by
    package and the top functions, per generated token."""
    from dsi.tools.experiments import cluster as xcluster
    from dsi.tools.experiments import config as xconfig
    from dsi.tools.experiments.bench import generate_once
    from dsi.wire.client import Client

    zero = xconfig.Cluster((xconfig.Instance(ZERO_TARGET),), (xconfig.Instance(ZERO_DRAFTER),))
    running = await xcluster.start(zero, "inproc")
    prompt = list(range(1, prompt_len + 1))
    try:
        async with Client(running.address) as client:
            await generate_once(client, prompt, 16, "nonsi", 1)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(rounds):
                await generate_once(client, prompt, tokens, "nonsi", 1)
            prof.disable()
    finally:
        await running.close()
    prof.dump_stats(str(out))
    st = pstats.Stats(prof)
    n = tokens * rounds
    groups: dict[str, float] = {}
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        groups[group_of(filename)] = groups.get(group_of(filename), 0.0) + tt
        rows.append((tt, ct, nc, f"{_short(filename)}:{line}({func})"))
    total = sum(groups.values())
    rows.sort(reverse=True)
    return {
        "total_ms_per_token": 1e3 * total / n,
        "groups_ms_per_token": {k: round(1e3 * v / n, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_self": [
            {"self_us_per_token": round(1e6 * tt / n, 2), "calls_per_token": round(nc / n, 2), "function": name}
            for tt, _ct, nc, name in rows[:top]
        ],
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/dsi/", "/services/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1] if marker != "/lib/python3" else filename.split(marker, 1)[1][3:]
    return filename


def report(res: dict[str, Any]) -> str:
    head = f"overhead per token, zero-latency synthetic models, {res['tokens']} tokens, median of {res['rounds']}"
    lines = []
    for variant, parts in res.get("variants", {"": res}).items():
        how = {"stream": ", verifications on a VerifyStream", "unary": ", verifications as unary Verify calls"}
        lines.append(f"{head}{how.get(variant, '')}:")
        for name in PARTS:
            if name not in parts:
                continue
            part = parts[name]
            cpu = part.get("cpu_ms_per_token", {})
            cpu_txt = ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())
            tail = f"   CPU ms/token: {cpu_txt}" if cpu else ""
            lines.append(f"  {name:<23} {part['ms_per_token']:7.3f} ms/token{tail}")
    return "\n".join(lines)


def profile_report(p: dict[str, Any]) -> str:
    lines = [f"cProfile, non-SI, all services in one process: {p['total_ms_per_token']:.3f} ms of CPU per token"]
    for k, v in p["groups_ms_per_token"].items():
        lines.append(f"  {k:<34} {v:7.3f} ms/token")
    lines.append("  top functions by self time (us/token, calls/token):")
    for r in p["top_self"]:
        lines.append(f"    {r['self_us_per_token']:8.2f} {r['calls_per_token']:6.2f}  {r['function']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=256, help="tokens per generation (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--lookahead", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5, help="repeats of each part (default: %(default)s)")
    p.add_argument(
        "--verify-stream",
        choices=("both", "on", "off"),
        default="both",
        help="verifications on a VerifyStream per replica (on), as unary Verify calls (off), or both, rounds"
        " alternating (default: %(default)s)",
    )
    p.add_argument("--profile", metavar="FILE", help="also profile non-SI in one process with cProfile")
    p.add_argument("--json", metavar="FILE", help="write the numbers here")


async def arun(args: argparse.Namespace) -> dict[str, Any]:
    which = getattr(args, "verify_stream", "both")
    variants = {"both": ("stream", "unary"), "on": ("stream",), "off": ("unary",)}[which]
    res = await measure(args.tokens, args.prompt_len, args.lookahead, args.rounds, None, variants)
    print(report(res), flush=True)
    if args.profile:
        res["profile"] = await profile(args.tokens, args.prompt_len, args.rounds, Path(args.profile))
        print(profile_report(res["profile"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))  # noqa: ASYNC240 - once, at the end
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsi.tools.experiments.overhead", description=__doc__)
    add_arguments(p)
    asyncio.run(arun(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
