"""The ``dsi`` command, run as subprocesses (``python -m dsi ...``).

Every subprocess call has a timeout, and every long-running process is killed
when a test fails. Output of long-running processes goes to files, so nothing
blocks on a full pipe.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dsi.v1 import drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DSI = [sys.executable, "-m", "dsi"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SPEC = "synthetic:vocab=100,seed=1,tpot_ms=1"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def run_dsi(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``dsi ARGS`` to completion (killed after ``timeout`` seconds)."""
    return subprocess.run(
        [*DSI, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def wait_for(predicate: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` (bounded); fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.05)


@dataclass
class Service:
    proc: subprocess.Popen
    stderr: Path
    stdout: Path

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")


@contextmanager
def start_dsi(tmp: Path, name: str, *args: str) -> Iterator[Service]:
    """A long-running ``dsi`` process; killed on exit if still running."""
    err, out = tmp / f"{name}.stderr", tmp / f"{name}.stdout"
    with open(err, "wb") as e, open(out, "wb") as o:
        proc = subprocess.Popen([*DSI, *args], cwd=ROOT, env=ENV, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    try:
        yield Service(proc, err, out)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def json_log_lines(text: str) -> list[dict]:
    """Every non-empty line parsed as a JSON log record with ts, level, msg."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)  # fails the test on a non-JSON line
        assert isinstance(rec, dict), line
        assert {"ts", "level", "msg"} <= rec.keys(), line
        assert TS.match(rec["ts"]), rec["ts"]
        assert rec["level"] in {"debug", "info", "warning", "error", "critical"}, line
        records.append(rec)
    return records


def proc_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_pids(pid: int) -> set[int]:
    """Direct children of ``pid`` (Linux /proc, else ``ps``)."""
    tasks = Path(f"/proc/{pid}/task")
    if tasks.is_dir():
        out: set[int] = set()
        for t in tasks.iterdir():
            try:
                out |= {int(p) for p in (t / "children").read_text().split()}
            except OSError:
                pass
        return out
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, timeout=10)
    return {int(p) for p in ps.stdout.split()}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- help and start-up errors -------------------------------------------------


def test_help_of_every_command() -> None:
    commands = {
        (): ["target", "drafter", "coordinator", "generate", "up"],
        ("target",): [
            "--model",
            "--device",
            "--dtype",
            "--port",
            "--announce",
            "--max-sessions",
            "--grace",
            "--threads",
        ],
        ("drafter",): ["--model", "--max-lookahead", "--announce", "--threads"],
        ("coordinator",): ["--target", "--drafter", "--strategy", "--lookahead", "--tokenizer"],
        ("generate",): ["--coordinator", "--prompt-ids", "--max-new-tokens", "--json", "--temperature"],
        ("up",): [
            "--demo",
            "--synthetic",
            "--targets",
            "--target-model",
            "--drafter-model",
            "--log-dir",
            "--threads",
            "--http-port",
        ],
    }
    procs = {
        cmd: subprocess.Popen(
            [*DSI, *cmd, "--help"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd in commands
    }
    try:
        for cmd, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, (cmd, err)
            assert out.startswith("usage: dsi" + "".join(f" {c}" for c in cmd)), out[:200]
            for word in commands[cmd]:
                assert word in out, (cmd, word)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    version = run_dsi("--version")
    assert version.returncode == 0 and re.fullmatch(r"dsi \d+\.\d+\.\d+\S*\n", version.stdout), version


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    r = run_dsi("target", "--model", str(missing), "--port", "0")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert str(missing) in r.stderr
    assert "does not exist" in r.stderr and r.stderr.startswith("dsi target: error:")


@pytest.mark.parametrize(
    ("command", "spec", "message"),
    [
        ("target", "synthetic:vocab=100,colour=red", "known keys"),
        ("drafter", "synthetic:vocab=abc", "vocab must be"),
        ("drafter", "synthetic:acceptance=2", "acceptance must lie in [0, 1]"),
    ],
)
def test_bad_synthetic_spec_is_a_clear_error(command: str, spec: str, message: str) -> None:
    r = run_dsi(command, "--model", spec, "--port", "0")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"dsi {command}: error:") and message in r.stderr, r.stderr


def test_generate_without_prompt_is_a_clear_error() -> None:
    r = run_dsi("generate", "--coordinator", "127.0.0.1:1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--prompt-ids" in r.stderr


# --- target and drafter processes ---------------------------------------------


def test_target_and_drafter_serve_and_stop_on_sigterm(tmp_path: Path) -> None:
    t_addr, d_addr = tmp_path / "target.addr", tmp_path / "drafter.addr"
    common = ["--port", "0", "--grace", "2"]
    with (
        start_dsi(tmp_path, "target", "target", "--model", SPEC, "--announce", str(t_addr), *common) as target,
        start_dsi(tmp_path, "drafter", "drafter", "--model", SPEC, "--announce", str(d_addr), *common) as drafter,
    ):
        wait_for(t_addr.exists, 60, "target announce file", target.proc)
        wait_for(d_addr.exists, 60, "drafter announce file", drafter.proc)
        target_address, drafter_address = t_addr.read_text(), d_addr.read_text()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", target_address) and not target_address.endswith(":0")

        with grpc.insecure_channel(target_address) as ch:
            stub = target_pb2_grpc.TargetServiceStub(ch)
            info = stub.Info(target_pb2.TargetServiceInfoRequest(), timeout=10)
            assert info.model.model_id == SPEC and info.model.vocab_size == 100
            resp = stub.Verify(target_pb2.VerifyRequest(session_id="cli", context_token_ids=[1, 2, 3]), timeout=10)
            assert 0 <= resp.next_token_id < 100
        with grpc.insecure_channel(drafter_address) as ch:
            dstub = drafter_pb2_grpc.DrafterServiceStub(ch)
            chunks = list(
                dstub.Draft(
                    drafter_pb2.DraftRequest(session_id="cli", context_token_ids=[1, 2, 3], lookahead=2, max_tokens=3),
                    timeout=10,
                )
            )
            assert [len(c.tokens) for c in chunks] == [2, 1]

        # A second server on a port in use fails with a clear message.
        port = target_address.rsplit(":", 1)[1]
        clash = run_dsi("target", "--model", SPEC, "--port", port)
        assert clash.returncode != 0 and "Traceback" not in clash.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in clash.stderr

        for svc in (target, drafter):
            svc.proc.send_signal(signal.SIGTERM)
        for name, svc in (("target", target), ("drafter", drafter)):
            assert svc.proc.wait(10) == 0, svc.err()
            records = json_log_lines(svc.err())
            msgs = [r["msg"] for r in records]
            assert msgs[0] == f"{name} serving", msgs
            assert "shutting down" in msgs and msgs[-1] == "stopped", msgs
            serving = records[0]
            assert serving["address"] == (target_address if name == "target" else drafter_address)
            assert serving["logger"] == f"dsi.{name}" and serving["vocab_size"] == 100
            assert svc.out() == ""


# --- dsi up -------------------------------------------------------------------


def test_up_demo(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    r = run_dsi(
        "up",
        "--synthetic",
        "--demo",
        "--targets",
        "2",
        "--max-new-tokens",
        "20",
        "--port",
        "0",
        "--log-dir",
        str(log_dir),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    greedy, sampled = r.stdout.split("== sampled (temperature 0.8, seed 1), 20 new tokens:")
    assert "== greedy (temperature 0), 20 new tokens:" in greedy
    for part in (greedy, sampled):  # both runs: every strategy, the same tokens, a speedup line
        assert "identical output for every strategy (lossless): yes" in part
        assert re.search(r"^speedup over non-SI: si \d+\.\d\dx, dsi \d+\.\d\dx$", part, re.M), part
        # each strategy timed 3 times (interleaved, after a warm-up); the medians compared, every time shown
        times = re.search(r"^\(each line: the median of 3 runs, interleaved; wall seconds (.*)\)$", part, re.M)
        assert times and re.fullmatch(r"nonsi( [\d.]+){3}; si( [\d.]+){3}; dsi( [\d.]+){3}", times[1]), part
        for strategy in ("nonsi", "si", "dsi"):
            assert re.search(rf"^\s*{strategy} -- 20 tokens in .* finish: length$", part, re.M), part
    # the sampled run uses the seed asked for (default 1) under every strategy
    assert len(re.findall(r"^\s*(?:nonsi|si|dsi) -- .*, seed 1, finish: length$", sampled, re.M)) == 3, sampled
    completion = re.compile(r"^   prompt ids \[1, 2, 3, 4, 5, 6, 7, 8\]: '(.*)'$", re.M)
    assert completion.findall(greedy) != completion.findall(sampled)  # sampling changed the text
    assert sorted(p.name for p in log_dir.glob("*.log")) == [
        "coordinator.log",
        "drafter.log",
        "target-0.log",
        "target-1.log",
    ]
    for log in log_dir.glob("*.log"):
        assert "stopped" in [rec["msg"] for rec in json_log_lines(log.read_text())], log


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--targets", "0"], "dsi up: error: --targets must be 1 or more, got 0"),
        (["--threads", "-1"], "dsi up: error: --threads must be 0 or more, got -1"),
        (["--demo-rounds", "0"], "dsi up: error: --demo-rounds must be 1 or more, got 0"),
    ],
)
def test_up_rejects_bad_counts_before_starting_anything(flags: list[str], message: str, tmp_path: Path) -> None:
    r = run_dsi("up", "--synthetic", "--demo", "--port", "0", "--log-dir", str(tmp_path), *flags, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == message, r.stderr
    assert list(tmp_path.iterdir()) == []  # no service was started


def test_model_servers_reject_negative_threads() -> None:
    for role in ("target", "drafter"):
        r = run_dsi(role, "--threads", "-1", "--port", "0")
        assert r.returncode == 2 and "argument --threads: must be 0 or more, got -1" in r.stderr, r.stderr


def test_apply_cpu_threads_sets_torch_intra_op_threads() -> None:
    code = (
        "import torch; from dsi.backends import apply_cpu_threads; "
        "before = torch.get_num_threads(); apply_cpu_threads(0); same = torch.get_num_threads(); "
        "apply_cpu_threads(1); print(before == same, torch.get_num_threads())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split() == ["True", "1"], r.stdout + r.stderr


def wait_for_coordinator(svc: Service, timeout: float) -> str:
    """The address a running ``dsi up`` prints once its coordinator serves."""
    found: list[str] = []

    def listening() -> bool:
        found[:] = re.findall(r"coordinator listening on (\S+)", svc.err())
        return bool(found)

    wait_for(listening, timeout, "'coordinator listening on'", svc.proc)
    return found[0]


@dataclass
class Up:
    service: Service
    address: str
    log_dir: Path
    children: set[int]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``dsi up --synthetic`` serving (no --demo) on a free port (the default
    pair is tested in test_demo_models.py)."""
    tmp = tmp_path_factory.mktemp("up")
    log_dir = tmp / "logs"
    args = ["up", "--synthetic", "--targets", "2", "--port", "0", "--log-dir", str(log_dir), "--max-new-tokens", "30"]
    args += ["--http-port", "0", "--metrics-port", "0"]
    children: set[int] = set()
    with start_dsi(tmp, "up", *args) as svc:
        try:
            address = wait_for_coordinator(svc, 90)
            children |= child_pids(svc.proc.pid)
            yield Up(svc, address, log_dir, children)
        finally:
            if svc.proc.poll() is None:
                svc.proc.send_signal(signal.SIGINT)
                try:
                    svc.proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            for pid in children:  # never leave orphans behind, whatever happened
                if proc_alive(pid) and " -m dsi " in cmdline(pid):
                    os.kill(pid, signal.SIGKILL)


def test_up_generate_json(up: Up) -> None:
    r = run_dsi(
        "generate", "--coordinator", up.address, "--prompt-ids", "1,2,3", "--max-new-tokens", "10", "--json", timeout=60
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"token_ids", "text", "finish_reason", "stats"}
    assert len(out["token_ids"]) == 10 and all(isinstance(t, int) for t in out["token_ids"])
    assert out["text"].split() == [str(t) for t in out["token_ids"]]  # synthetic: ids joined by spaces
    assert out["finish_reason"] == "length"
    stats = out["stats"]
    for key in (
        "new_tokens",
        "wall_seconds",
        "time_to_first_token_seconds",
        "target_forward_passes",
        "drafted_tokens",
        "accepted_tokens",
        "acceptance_rate",
        "verifications_started",
        "verifications_cancelled",
        "preemptions",
        "draft_streams",
    ):
        assert key in stats, key
    assert all(re.fullmatch(r"[a-z0-9_]+", k) for k in stats), stats
    assert stats["new_tokens"] == 10
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["verifications_started"] >= 1 and stats["wall_seconds"] > 0


def test_up_passes_http_and_metrics_ports_to_the_coordinator(up: Up) -> None:
    import urllib.request

    api = re.search(r"^OpenAI-compatible API serving: (http://\S+)$", up.service.err(), re.M)
    metrics = re.search(r"^metrics serving: (http://\S+/metrics)$", up.service.err(), re.M)
    assert api and metrics, up.service.err()
    with urllib.request.urlopen(f"{api[1]}/v1/models", timeout=10) as resp:
        assert json.loads(resp.read())["data"][0]["id"].startswith("synthetic"), api[1]
    generate = run_dsi("generate", "--coordinator", up.address, "--prompt-ids", "1,2", "--max-new-tokens", "3")
    assert generate.returncode == 0, generate.stderr
    with urllib.request.urlopen(metrics[1], timeout=10) as resp:
        text = resp.read().decode()
    assert re.search(r"^dsi_requests_total\{.*\} [1-9]", text, re.M), text[:2000]


def test_up_generate_timeline_writes_chrome_trace_and_png(up: Up, tmp_path: Path) -> None:
    r = run_dsi(
        "generate", "--coordinator", up.address, "--prompt-ids", "1,2,3", "--max-new-tokens", "12",
        "--strategy", "dsi", "--timeline", str(tmp_path / "gen.json"), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"timeline: {tmp_path / 'gen.json'}, {tmp_path / 'gen.png'}" in r.stderr
    trace = json.loads((tmp_path / "gen.json").read_text())
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert any(n.startswith("drafter 127.0.0.1:") for n in lanes) and "commits" in lanes
    assert any(n.startswith("target 127.0.0.1:") for n in lanes)
    commits = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert len(commits) == 12 and trace["otherData"]["strategy"] == "dsi"
    assert (tmp_path / "gen.png").read_bytes()[:4] == b"\x89PNG"


def test_up_generate_text_prompt_without_tokenizer_fails_clearly(up: Up) -> None:
    r = run_dsi("generate", "--coordinator", up.address, "def fibonacci(n):", timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("dsi generate: error:")
    assert "no tokenizer" in r.stderr and "prompt_token_ids" in r.stderr, r.stderr
    assert r.stdout.strip() == ""


def test_up_stops_on_sigint_and_leaves_no_children(up: Up) -> None:
    """Runs last in this module: it stops the shared ``dsi up``."""
    children = up.children
    assert len(children) == 4, [cmdline(p) for p in children]  # 2 targets, a drafter, a coordinator
    roles = sorted(cmdline(p).split(" -m dsi ")[1].split()[0] for p in children)
    assert roles == ["coordinator", "drafter", "target", "target"]
    # The model processes share the cores: 2 targets + a drafter on the CPU.
    share = str(max(1, (os.cpu_count() or 1) // 3))
    for p in children:
        argv = cmdline(p).split()
        if "coordinator" not in argv:
            assert argv[argv.index("--threads") + 1] == share, argv
    assert all(proc_alive(p) for p in children)

    up.service.proc.send_signal(signal.SIGINT)
    assert up.service.proc.wait(30) == 0, up.service.err()
    assert "stopping..." in up.service.err()
    alive = [p for p in children if proc_alive(p)]
    assert alive == [], [cmdline(p) for p in alive]
    # Each service was stopped gracefully (SIGTERM), not killed.
    logs = sorted(up.log_dir.glob("*.log"))
    assert len(logs) == 4
    for log in logs:
        msgs = [rec["msg"] for rec in json_log_lines(log.read_text())]
        assert "shutting down" in msgs and msgs[-1] == "stopped", (log.name, msgs)


def test_up_sizes_cpu_replicas_to_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from dsi.tools.up import default_targets, model_threads

    def ns(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{"device": "cpu", "target_model": "models/x", "threads": 0, "targets": 2, **kw})

    for cores, replicas, threads in ((1, 1, 1), (2, 2, 1), (3, 3, 1), (16, 4, 3)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert default_targets(ns()) == replicas, cores
        assert model_threads(ns(targets=replicas)) == threads, cores
    assert default_targets(ns(device="cuda:0")) == 4 and model_threads(ns(device="cuda:0")) == 0
    assert default_targets(ns(target_model="synthetic:tpot_ms=30")) == 4
    assert model_threads(ns(threads=5)) == 5


def test_up_with_otlp_endpoint_exports_one_trace_per_generation(tmp_path: Path) -> None:
    """Every service exports its spans by OTLP/gRPC (to dsi's own sink here);
    one generation is one trace across the four processes."""
    spans_file, announce = tmp_path / "spans.jsonl", tmp_path / "sink.url"
    sink_args = ["-m", "dsi.tools.otlp_sink", "--port", "0", "--out", str(spans_file), "--announce", str(announce)]
    with open(tmp_path / "sink.stderr", "wb") as err:
        sink = subprocess.Popen([sys.executable, *sink_args], cwd=ROOT, env=ENV, stderr=err, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: announce.exists() and announce.read_text(), 60, "the OTLP sink", sink)
        url = announce.read_text()
        args = ["up", "--synthetic", "--targets", "2", "--port", "0", "--log-dir", str(tmp_path / "logs")]
        with start_dsi(tmp_path, "up", *args, "--otlp-endpoint", url) as svc:
            address = wait_for_coordinator(svc, 90)
            r = run_dsi("generate", "--coordinator", address, "--prompt-ids", "1,2,3", "--max-new-tokens", "20")
            assert r.returncode == 0, r.stderr
            svc.proc.send_signal(signal.SIGINT)  # the services flush their spans as they stop
            assert svc.proc.wait(30) == 0, svc.err()
        wait_for(lambda: spans_file.exists() and "dsi.v1.GenerationService/Generate" in spans_file.read_text(), 30,
                 "the Generate span", sink)  # fmt: skip
    finally:
        sink.send_signal(signal.SIGINT)
        sink.wait(10)
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    (root,) = [s for s in spans if s["name"] == "dsi.v1.GenerationService/Generate"]
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    assert {s["service"] for s in trace} == {"dsi-coordinator", "dsi-target", "dsi-drafter"}
    ids = {s["span_id"]: s for s in trace}
    verifies = [s for s in trace if s["name"] == "Verify"]
    assert verifies and all(s["attributes"]["dsi.outcome"] for s in verifies)
    served = [s for s in trace if s["name"] == "dsi.v1.TargetService/Verify"]
    assert served and all(ids[s["parent_span_id"]]["name"] == "Verify" for s in served)
    forwards = [s for s in trace if s["name"] == "target forward"]
    assert forwards and all(ids[s["parent_span_id"]] in served for s in forwards)
    drafted = [s for s in trace if s["name"] == "drafter forward"]
    assert drafted and all(ids[s["parent_span_id"]]["name"] == "dsi.v1.DrafterService/Draft" for s in drafted)
