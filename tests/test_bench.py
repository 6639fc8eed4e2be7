"""`dsi bench` end to end on tiny clusters (fast: milliseconds of latency, few
tokens), the injected network delay, and the report files. Performance itself
is shown by the benchmarks in docs/benchmarks.md, not asserted here."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from pathlib import Path

import pytest

from dsi.domain.types import DraftRequest, VerifyRequest
from dsi.tools.cli import main as cli_main
from dsi.tools.experiments import netdelay
from tests.helpers import record_params, serve

TARGET = "synthetic:vocab=512,seed=3,ttft_ms=4,tpot_ms=3"
DRAFTER = "synthetic:vocab=512,seed=3,ttft_ms=1,tpot_ms=0.5,acceptance=0.7"
QUICK = [
    "--tokens",
    "12",
    "--repeats",
    "1",
    "--prompts",
    "1",
    "--prompt-len",
    "6",
    "--warmup",
    "0",
    "--no-calibrate",
    "--no-progress",
    "--sim-repeats",
    "20",
]


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return int(exc.value.code or 0)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_inproc_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "b"
    code = _cli(
        [
            "bench",
            "--launch",
            "inproc",
            "--targets",
            "2",
            "--target-model",
            TARGET,
            "--drafter-model",
            DRAFTER,
            "--lookahead",
            "3",
            *QUICK,
            "--timeline",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    # --timeline: the schedule of the first run of every strategy
    for s in ("nonsi", "si", "dsi"):
        (trace,) = (out / "timelines").glob(f"*-{s}-r0-p0.json")
        events = json.loads(trace.read_text())["traceEvents"]
        assert len([e for e in events if e["ph"] == "i"]) == 12, s  # one commit mark per token
        assert _is_png(trace.with_suffix(".png"))
    assert len(list((out / "timelines").iterdir())) == 6, "that run only"
    runs = _rows(out / "runs.csv")
    assert sorted(r["strategy"] for r in runs) == ["dsi", "nonsi", "si"]
    for r in runs:
        assert int(r["tokens"]) == 12
        assert r["matches"] == "True"  # lossless: every strategy returned the same tokens
        assert float(r["latency_ms"]) > 0
        assert float(r["server_wall_ms"]) > 0
    summary = {r["strategy"]: r for r in _rows(out / "summary.csv")}
    assert 0.0 <= float(summary["dsi"]["acceptance_rate"]) <= 1.0
    assert float(summary["nonsi"]["simulated_latency_ms"]) == pytest.approx(4 + 11 * 3)
    for s in ("nonsi", "si", "dsi"):
        overhead = float(summary[s]["overhead"])
        assert math.isfinite(overhead) and overhead > 0.5  # measured / simulated: sane, never absurdly fast
        replayed = float(summary[s]["overhead_replay"])  # the model on the run's own draws
        assert math.isfinite(replayed) and replayed > 0.5
        linked = float(summary[s]["overhead_1us_links"])  # the model on the real side of its ties
        assert math.isfinite(linked) and linked > 0.5
        assert math.isfinite(float(summary[s]["overhead_replay_1us_links"]))
    # non-SI: a step per token, each 2 µs longer with links of 1 µs each way
    assert float(summary["nonsi"]["simulated_1us_links_ms"]) == pytest.approx(4 + 11 * 3 + 12 * 0.002)
    # non-SI draws nothing: its replay is the model
    assert float(summary["nonsi"]["simulated_replay_ms"]) == float(summary["nonsi"]["simulated_latency_ms"])
    (speed,) = _rows(out / "speedups.csv")
    for key in ("dsi_over_si_measured", "dsi_over_nonsi_measured", "dsi_over_si_simulated"):
        assert 0 < float(speed[key]) < 10
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["run"]["launch"] == "inproc"
    assert "dsi bench" in (out / "report.md").read_text()
    assert _is_png(out / "speedups.png") and _is_png(out / "latency.png")


def test_bench_auto_lookahead_runs_next_to_the_fixed_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--auto-lookahead: SI and DSI with lookahead 0 (chosen as they run) in the same rotation, the same
    tokens, compared with the fixed k and with the model at the fixed k. The coordinator really runs them
    with the automatic lookahead (it ran them with its default, 5, when they asked with a request's 0)."""
    seen = record_params(monkeypatch)
    out = tmp_path / "a"
    argv = ["bench", "--launch", "inproc", "--targets", "2", "--target-model", TARGET, "--drafter-model", DRAFTER]
    argv += [*QUICK, "--strategies", "si,dsi", "--auto-lookahead", "--lookahead", "3", "--out", str(out)]
    assert _cli(argv) == 0
    chosen = [(p.strategy.value, p.lookahead) for p in seen]
    assert sorted(set(chosen)) == [("dsi", 0), ("dsi", 3), ("si", 0), ("si", 3)]
    assert chosen.count(("dsi", 0)) == chosen.count(("dsi", 3)) == chosen.count(("si", 0)) >= 1
    summary = {r["strategy"]: r for r in _rows(out / "summary.csv")}
    assert set(summary) == {"si", "dsi", "si_auto", "dsi_auto"}
    assert summary["si_auto"]["lookahead"] == summary["dsi_auto"]["lookahead"] == "0"
    assert all(r["all_match"] == "True" for r in summary.values()), "auto gives the same tokens"
    for auto, fixed in (("si_auto", "si"), ("dsi_auto", "dsi")):
        assert summary[auto]["simulated_latency_ms"] == summary[fixed]["simulated_latency_ms"]
        assert math.isfinite(float(summary[auto]["overhead"]))
    (speed,) = _rows(out / "speedups.csv")
    assert 0 < float(speed["si_auto_over_si_measured"]) < 10 and 0 < float(speed["dsi_auto_over_dsi_measured"]) < 10
    assert "si_auto / si" in (out / "report.md").read_text()


def test_bench_experiment_file_with_sweep_and_delays(tmp_path: Path) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(
        f"""
name = "tiny"
[run]
launch = "inproc"
[[profile]]
name = "tiny"
targets = [{{ model = "{TARGET}", count = 2 }}, {{ model = "{TARGET}", delay_ms = 1.0 }}]
drafters = [{{ model = "{DRAFTER}", delay_ms = 0.5 }}]
[sweep]
sp = [1, 3]
"""
    )
    out = tmp_path / "e"
    assert _cli(["bench", "--experiment", str(exp), *QUICK, "--strategies", "nonsi,dsi", "--out", str(out)]) == 0
    speed = _rows(out / "speedups.csv")
    assert [r["point"] for r in speed] == ["tiny[sp=1]", "tiny[sp=3]"]
    assert all(r["sweep_sp"] in ("1", "3") for r in speed)
    summary = _rows(out / "summary.csv")
    assert {r["strategy"] for r in summary} == {"nonsi", "dsi"}
    assert all(r["all_match"] == "True" for r in summary)


def test_bench_subprocess_cluster_with_delay(tmp_path: Path) -> None:
    """The default launch: every service its own process, the coordinator
    with delay-injecting channels (dsi.tools.experiments.coordinator)."""
    out = tmp_path / "s"
    code = _cli(
        [
            "bench",
            "--targets",
            "2",
            "--target-model",
            TARGET,
            "--drafter-model",
            DRAFTER,
            "--target-delay-ms",
            "1",
            *QUICK,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    runs = _rows(out / "runs.csv")
    assert len(runs) == 3 and all(r["matches"] == "True" for r in runs)
    assert (out / "logs" / "coordinator.log").exists()


def test_bench_grid(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "g"
    code = _cli(
        [
            "bench",
            "--grid",
            "--grid-size",
            "2,2",
            "--grid-lookaheads",
            "1,3",
            "--launch",
            "inproc",
            "--targets",
            "2",
            "--target-model",
            TARGET,
            "--drafter-model",
            DRAFTER,
            *QUICK,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    grid = _rows(out / "grid.csv")
    assert len(grid) == 4
    assert {(r["drafter_fraction"], r["acceptance"]) for r in grid} == {
        (f, a) for f in ("0.01", "1") for a in ("0.01", "0.99")
    }
    runs = _rows(out / "runs.csv")
    assert sum(r["strategy"] == "nonsi" for r in runs) == 4  # measured once, reported for every cell
    assert all(math.isfinite(float(r[f"{s}_overhead_replay"])) for r in grid for s in ("nonsi", "si", "dsi"))
    assert all(math.isfinite(float(r[f"{s}_overhead_1us_links"])) for r in grid for s in ("nonsi", "si", "dsi"))
    for name in ("grid.png", "grid_compare.png", "grid_overhead.png"):
        assert _is_png(out / name)


def test_bench_hf_models_with_hf_peers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from dsi.tools.experiments.hfmodels import build

    models = build(tmp_path / "models", size="tiny")
    out = tmp_path / "h"
    code = _cli(
        [
            "bench",
            "--launch",
            "inproc",
            "--targets",
            "1",
            "--target-model",
            str(models["target"]),
            "--drafter-model",
            str(models["drafter"]),
            "--lookahead",
            "2",
            *QUICK,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = {r["strategy"]: r for r in _rows(out / "summary.csv")}
    assert set(summary) == {"nonsi", "si", "dsi", "hf_generate", "hf_assisted"}
    assert math.isnan(float(summary["dsi"]["simulated_latency_ms"]))  # no latency model for real models
    # HF's own greedy decoding and ours agree token for token
    assert all(r["all_match"] == "True" for r in summary.values())
    (speed,) = _rows(out / "speedups.csv")
    assert float(speed["dsi_over_hf_assisted"]) > 0


# --- injected network delay ----------------------------------------------------------------------


async def test_delay_interceptors_add_the_delay_both_ways() -> None:
    from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
    from dsi.wire.transport import GrpcDrafter, GrpcTarget
    from services.drafter.service import register as register_drafter
    from services.target.service import register as register_target

    target = LocalTarget(load_target_model("synthetic:vocab=64,seed=1"))
    drafter = LocalDrafter(load_drafter_model("synthetic:vocab=64,seed=1"))
    async with serve(register_target(target)) as t_srv, serve(register_drafter(drafter)) as d_srv:
        delay = 0.02
        t = GrpcTarget(t_srv.address, interceptors=netdelay.interceptors(delay * 1000))
        d = GrpcDrafter(d_srv.address, interceptors=netdelay.interceptors(delay * 1000))
        try:
            start = time.perf_counter()
            result = await t.verify(VerifyRequest("s1", [1, 2, 3]))
            assert time.perf_counter() - start >= 2 * delay  # request and response each delayed
            assert 0 <= result.next_token < 64

            start = time.perf_counter()
            stream = d.draft(DraftRequest("s1", [1, 2, 3], lookahead=2, max_tokens=6))
            chunks = [c async for c in stream]
            assert time.perf_counter() - start >= 2 * delay
            assert [len(c.tokens) for c in chunks] == [2, 2, 2]

            # cancelling a delayed stream stops it on the server
            stream = d.draft(DraftRequest("s2", [1, 2, 3], lookahead=1, max_tokens=0))
            await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                if drafter.active_streams == 0:
                    break
                await asyncio.sleep(0.01)
            assert drafter.active_streams == 0
        finally:
            await t.close()
            await d.close()


def test_no_delay_means_no_interceptors() -> None:
    assert netdelay.interceptors(0) is None
    assert len(netdelay.interceptors(1.5) or []) == 2


def test_bench_overhead_budget(tmp_path: Path) -> None:
    """`dsi bench --overhead`: every part of the budget, through service processes."""
    out = tmp_path / "o"
    argv = ["bench", "--overhead", "--tokens", "24", "--repeats", "1", "--prompt-len", "40", "--out", str(out)]
    assert _cli(argv) == 0
    res = json.loads((out / "overhead.json").read_text())
    for part in ("target_rpc", "target_decode", "draft_stream", "nonsi", "si", "dsi"):
        assert res[part]["ms_per_token"] > 0, part
        assert set(res[part]["cpu_ms_per_token"]) == {"target-0", "drafter-0", "coordinator", "client"}
    assert math.isclose(
        res["client_coordinator"]["ms_per_token"], res["nonsi"]["ms_per_token"] - res["target_decode"]["ms_per_token"]
    )
    assert res["draft_stream"]["cpu_ms_per_token"]["target-0"] == 0, "the draft stream leaves the target idle"


async def test_overhead_profile_groups_the_time(tmp_path: Path) -> None:
    from dsi.tools.experiments import overhead

    prof = await overhead.profile(24, 40, 1, tmp_path / "p.out")
    assert (tmp_path / "p.out").stat().st_size > 0
    groups = prof["groups_ms_per_token"]
    assert {"grpc", "asyncio event loop", "coordinator engine", "target backend and decision"} <= set(groups)
    assert math.isclose(sum(groups.values()), prof["total_ms_per_token"], rel_tol=1e-3)
    assert len(prof["top_self"]) == 25
