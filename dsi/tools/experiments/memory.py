"""Memory under requests of every shape: how much resident memory (RSS) a
request takes a service to, and whether it keeps it afterwards.

    python -m dsi.tools.experiments.memory [--big-mb 60] [--json FILE]

Starts a synthetic target, drafter and coordinator (with the OpenAI HTTP API)
as separate processes on loopback, warms them up with a few ordinary
generations, and measures each one's idle RSS. Then for every case (a huge
prompt, a prompt just under the message limit, thousands of stop strings,
malformed protobuf bytes, deeply nested JSON, a direct Verify or Draft with a
huge context, ...) it resets each process's peak-RSS mark
(``/proc/PID/clear_refs``, Linux), sends the request, and reports the answer,
the peak RSS while it was handled (``VmHWM``) and the RSS a second later.
The bound the services keep (issue 16): a peak of at most twice the idle RSS
plus the request's own size.

Linux only (``/proc``). Numbers in docs/benchmarks.md ("Memory").
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from dsi.serving.gate import default_message_limit
from dsi.tools.experiments.procs import Service, free_port, rss_kib, spawn
from dsi.v1 import drafter_pb2, generation_pb2, target_pb2

TARGET = "synthetic:vocab=1000,seed=3,tpot_ms=1"
DRAFTER = "synthetic:vocab=1000,seed=3,tpot_ms=0.2,acceptance=0.7"
KIB = 1024
MIB = 1024 * KIB


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


@dataclass
class Measurement:
    case: str
    service: str
    request_bytes: int
    answer: str
    idle_mib: float
    before_mib: float
    peak_mib: float
    after_mib: float
    bound_mib: float

    @property
    def within(self) -> bool:
        return self.peak_mib <= self.bound_mib


class Cluster:
    """One target, one drafter, one coordinator (gRPC + HTTP), each its own process."""

    def __init__(
        self, workdir: Path, extra: dict[str, list[str]] | None = None, services_from: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.extra = extra or {}
        #: another checkout of dsi to run the services from (a before/after comparison)
        self.services_from = services_from
        self.services: dict[str, Service] = {}
        self.http_port = free_port()
        #: RSS (KiB) of each service once warmed up, before any odd request
        self.idle: dict[str, int] = {}

    def _spawn(self, name: str, *argv: str) -> Service:
        extra = [*self.extra.get(name, []), "--log-level", "warning"]
        svc = spawn(self.workdir, name, [*argv, *extra], source=self.services_from)
        self.services[name] = svc
        return svc

    def start(self) -> None:
        t = self._spawn("target", "target", "--model", TARGET)
        d = self._spawn("drafter", "drafter", "--model", DRAFTER)
        self._spawn(
            "coordinator",
            "coordinator",
            "--target",
            t.address,
            "--drafter",
            d.address,
            "--http-port",
            str(self.http_port),
        )

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            if svc.popen.poll() is None:
                svc.popen.send_signal(signal.SIGTERM)
                try:
                    svc.popen.wait(15)
                except subprocess.TimeoutExpired:
                    svc.popen.kill()
                    svc.popen.wait(5)


# --- sending raw requests ------------------------------------------------------------

CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * MIB)]


def _grpc_unary(address: str, method: str, payload: bytes) -> str:
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as ch:
        try:
            ch.unary_unary(method)(payload, timeout=120)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {(exc.details() or '')[:90]}"
    return "OK"


def _grpc_stream(address: str, method: str, payload: bytes) -> str:
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as ch:
        try:
            for _ in ch.unary_stream(method)(payload, timeout=120):
                pass
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {(exc.details() or '')[:90]}"
    return "OK"


def _http_post(url: str, body: bytes) -> str:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            return f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"][:90]
        except (ValueError, KeyError, TypeError):
            pass
        return f"HTTP {exc.code}: {detail}"
    except (urllib.error.URLError, ConnectionError) as exc:
        return f"connection error: {exc}"


GENERATE = "/dsi.v1.GenerationService/Generate"
VERIFY = "/dsi.v1.TargetService/Verify"
DRAFT = "/dsi.v1.DrafterService/Draft"


@dataclass
class Case:
    name: str
    service: str  # the one addressed
    make: Callable[[], bytes]  # the request's bytes (built when needed: some are large)
    send: Callable[[Cluster, bytes], str]


def _generate(cl: Cluster, payload: bytes) -> str:
    return _grpc_stream(cl.services["coordinator"].address, GENERATE, payload)


def _verify(cl: Cluster, payload: bytes) -> str:
    return _grpc_unary(cl.services["target"].address, VERIFY, payload)


def _draft(cl: Cluster, payload: bytes) -> str:
    return _grpc_stream(cl.services["drafter"].address, DRAFT, payload)


def _completions(cl: Cluster, payload: bytes) -> str:
    return _http_post(f"http://127.0.0.1:{cl.http_port}/v1/completions", payload)


CONCURRENT = 20
#: The services' default request-size limit for the synthetic models' context (8192 tokens).
LIMIT = default_message_limit(8192)


def _concurrently(send: Callable[[Cluster, bytes], str], n: int) -> Callable[[Cluster, bytes], str]:
    """Send ``n`` copies at once (threads); the answers, counted."""

    def run(cl: Cluster, payload: bytes) -> str:
        from collections import Counter
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:
            answers = Counter(pool.map(lambda _: send(cl, payload).split(":")[0], range(n)))
        return ", ".join(f"{k} x{v}" for k, v in answers.items())

    run.copies = n  # type: ignore[attr-defined]
    return run


def _gen(**kw: object) -> Callable[[], bytes]:
    return lambda: generation_pb2.GenerateRequest(**kw).SerializeToString()  # type: ignore[arg-type]


GARBAGE = b"\xff\xff\xff\xff\x0f" + bytes(range(64))


def cases(big_bytes: int) -> list[Case]:
    """Every request shape; the huge ones are ``big_bytes`` long."""
    big = f"{big_bytes / 1e6:g} MB"
    return [
        Case("generate, ordinary", "coordinator", _gen(prompt_token_ids=[1, 2, 3], max_new_tokens=32), _generate),
        Case(f"generate, {big} of prompt ids", "coordinator", _gen(prompt_token_ids=[1] * big_bytes), _generate),
        Case(
            "generate, prompt ids just under the size limit",
            "coordinator",
            _gen(prompt_token_ids=[1] * (LIMIT - 16)),
            _generate,
        ),
        Case(f"generate, {big} of prompt text", "coordinator", _gen(prompt="x" * big_bytes), _generate),
        Case(
            "generate, 10,000 stop strings",
            "coordinator",
            _gen(prompt_token_ids=[1, 2, 3], max_new_tokens=200, stop=[f"stop string {i}" for i in range(10_000)]),
            _generate,
        ),
        Case(
            "generate, a 200 kB stop string",
            "coordinator",
            _gen(prompt_token_ids=[1, 2, 3], max_new_tokens=50, stop=["x" * 200_000]),
            _generate,
        ),
        Case(
            "generate, 16 stop strings of 256 characters",
            "coordinator",
            _gen(prompt_token_ids=[1, 2, 3], max_new_tokens=200, stop=[chr(97 + i) * 256 for i in range(16)]),
            _generate,
        ),
        Case(
            "generate, prompt text just under the size limit",
            "coordinator",
            _gen(prompt="x" * (LIMIT - 16)),
            _generate,
        ),
        Case(
            f"generate, {CONCURRENT} at once, prompt ids just under the size limit",
            "coordinator",
            _gen(prompt_token_ids=[1] * (LIMIT - 16)),
            _concurrently(_generate, CONCURRENT),
        ),
        Case("generate, malformed protobuf", "coordinator", lambda: GARBAGE, _generate),
        Case(
            "HTTP, JSON nested 100,000 deep",
            "coordinator",
            lambda: b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            _completions,
        ),
        Case(
            f"HTTP, {big} of JSON",
            "coordinator",
            lambda: json.dumps({"prompt": [1] * (big_bytes // 3), "max_tokens": 1}).encode(),
            _completions,
        ),
        Case(
            f"verify, {big} of context",
            "target",
            lambda: target_pb2.VerifyRequest(session_id="m", context_token_ids=[1] * big_bytes).SerializeToString(),
            _verify,
        ),
        Case("verify, malformed protobuf", "target", lambda: GARBAGE, _verify),
        Case(
            f"draft, {big} of context",
            "drafter",
            lambda: drafter_pb2.DraftRequest(
                session_id="m", context_token_ids=[1] * big_bytes, lookahead=1, max_tokens=1
            ).SerializeToString(),
            _draft,
        ),
    ]


def warm_up(cluster: Cluster) -> None:
    c = cluster.services["coordinator"].address
    for strategy in (generation_pb2.STRATEGY_NONSI, generation_pb2.STRATEGY_SI, generation_pb2.STRATEGY_DSI):
        req = generation_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=64, strategy=strategy)
        _grpc_stream(c, GENERATE, req.SerializeToString())
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 16}).encode()
    _http_post(f"http://127.0.0.1:{cluster.http_port}/v1/completions", body)
    _http_post(f"http://127.0.0.1:{cluster.http_port}/v1/completions", b"{")


def measure(
    cluster: Cluster, big_bytes: int, only: int | None = None, settle: float = 1.0, warm: bool = True
) -> list[Measurement]:
    """Warm up (once), take the idle RSS, then send every case (or case number ``only``)."""
    if warm:
        warm_up(cluster)
        time.sleep(settle)
        cluster.idle = {name: rss_kib(s.pid)[0] for name, s in cluster.services.items()}
    idle = cluster.idle
    out = []
    for i, case in enumerate(cases(big_bytes)):
        if only is not None and i != only:
            continue
        name, service, payload = case.name, case.service, case.make()
        before = {}
        for sname, s in cluster.services.items():
            _reset_peak(s.pid)
            before[sname] = rss_kib(s.pid)[0]
        answer = case.send(cluster, payload)
        size = len(payload) * getattr(case.send, "copies", 1)  # what was sent in all
        del payload
        time.sleep(settle)
        for sname, s in cluster.services.items():
            if s.popen.poll() is not None:
                answer += f" ({sname} died)"
                continue
            rss, hwm = rss_kib(s.pid)
            if sname != service and hwm < 1.2 * before[sname]:
                continue  # the addressed service, and any other the request made grow
            bound = 2 * idle[sname] + size / KIB
            out.append(
                Measurement(
                    name,
                    sname,
                    size,
                    answer,
                    idle[sname] / KIB,
                    before[sname] / KIB,
                    hwm / KIB,
                    rss / KIB,
                    bound / KIB,
                )
            )
    return out


def run(
    big_bytes: int, fresh: bool = False, extra: dict[str, list[str]] | None = None, services_from: Path | None = None
) -> list[Measurement]:
    """Every case on one cluster, or (``fresh``) each on a cluster of its own."""
    runs: list[int | None] = list(range(len(cases(0)))) if fresh else [None]
    rows: list[Measurement] = []
    for only in runs:
        with tempfile.TemporaryDirectory(prefix="dsi-memory-") as tmp:
            cluster = Cluster(Path(tmp), extra, services_from)
            try:
                cluster.start()
                rows += measure(cluster, big_bytes, only)
            finally:
                cluster.stop()
    return rows


def table(rows: list[Measurement]) -> str:
    lines = [
        "| request | bytes | service | answer | idle MiB | before | peak | after | bound | within |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.request_bytes:,} | {r.service} | {r.answer.replace('|', '/')} | {r.idle_mib:.0f} |"
            f" {r.before_mib:.0f} | {r.peak_mib:.0f} | {r.after_mib:.0f} | {r.bound_mib:.0f} |"
            f" {'yes' if r.within else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsi.tools.experiments.memory", description=__doc__)
    p.add_argument("--big-mb", type=int, default=60, help="size of the huge requests in MB (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="a fresh cluster for every request (slower; no residue)")
    p.add_argument(
        "--services-from",
        type=Path,
        metavar="DIR",
        help="run the services from another checkout of dsi (e.g. an older commit, for a before/after comparison)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    rows = run(args.big_mb * 1_000_000, args.fresh, services_from=args.services_from)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"within": r.within} for r in rows], indent=2))
    return 0 if all(r.within for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
