"""The offline simulator (`dsi simulate`): closed forms, DSI's guarantees in
the model, grid mode and its files, experiment files."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dsi.tools.cli import main as cli_main
from dsi.tools.experiments import config as xconfig
from dsi.tools.experiments.simulate import (
    TIE_LINK_MS,
    Node,
    SimConfig,
    draw_coins,
    expected_tokens_per_si_round,
    nonsi_closed_form,
    read_csv,
    simulate_config,
    simulate_dsi,
    simulate_nonsi,
    simulate_one,
    simulate_si,
)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def cfg(
    a: float = 0.7,
    k: int = 5,
    n: int = 100,
    sp: int = 4,
    t: tuple[float, float] = (30.0, 30.0),
    d: tuple[float, float] = (3.0, 3.0),
    **kw,
) -> SimConfig:
    return SimConfig((Node(*t),) * sp, Node(*d), a, k, n, **kw)


# --- closed forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ttft,tpot,n", [(30, 30, 1), (90, 30, 50), (5, 12, 17)])
def test_nonsi_is_n_tpot_plus_ttft_minus_tpot(ttft: float, tpot: float, n: int) -> None:
    c = cfg(n=n, t=(ttft, tpot))
    assert simulate_nonsi(c).latency_ms == pytest.approx(n * tpot + (ttft - tpot))
    assert simulate_nonsi(c).latency_ms == pytest.approx(nonsi_closed_form(c))


def test_nonsi_with_link_delay_and_prefill() -> None:
    c = SimConfig((Node(40, 20, 0, 0.5, delay_ms=2),), Node(3, 3), 0.5, 5, 30, prompt_len=10)
    # every step pays one round trip; the first also prefills the 9 prompt tokens before the last
    assert simulate_nonsi(c).latency_ms == pytest.approx(30 * (20 + 4) + (40 - 20) + 0.5 * 9)
    assert nonsi_closed_form(c) == pytest.approx(simulate_nonsi(c).latency_ms)


@pytest.mark.parametrize("k,n", [(1, 10), (4, 37), (5, 100), (8, 9)])
def test_si_with_acceptance_one(k: int, n: int) -> None:
    t_t, t_d = 30.0, 3.0
    rounds = math.ceil(n / (k + 1))
    run = simulate_si(cfg(1.0, k, n, t=(t_t, t_t), d=(t_d, t_d)), np.ones(n, bool))
    # every round commits its drafts plus the bonus token; N - rounds tokens are drafted in all
    assert run.latency_ms == pytest.approx(rounds * t_t + (n - rounds) * t_d)
    assert run.target_forwards == rounds
    assert run.acceptance_rate == 1.0


@pytest.mark.parametrize("k,n", [(1, 10), (5, 40)])
def test_si_with_acceptance_zero(k: int, n: int) -> None:
    t_t, t_d = 30.0, 3.0
    run = simulate_si(cfg(0.0, k, n, t=(t_t, t_t), d=(t_d, t_d)), np.zeros(n, bool))
    drafted = sum(min(k, n - 1 - c) for c in range(n))  # one token (the correction) per round
    assert run.latency_ms == pytest.approx(n * t_t + drafted * t_d)
    assert run.target_forwards == n
    assert run.accepted == 0


def test_si_ttft_counts_once_per_model() -> None:
    n, k = 20, 4
    base = simulate_si(cfg(1.0, k, n), np.ones(n, bool)).latency_ms
    run = simulate_si(cfg(1.0, k, n, t=(50, 30), d=(7, 3)), np.ones(n, bool))
    assert run.latency_ms == pytest.approx(base + (50 - 30) + (7 - 3))


@pytest.mark.parametrize("a,k", [(0.3, 2), (0.6, 4), (0.9, 6)])
def test_si_tokens_per_round_matches_the_closed_form(a: float, k: int) -> None:
    n = 30000
    run = simulate_si(cfg(a, k, n), draw_coins(a, n, np.random.default_rng(1)))
    per_round = n / run.target_forwards
    assert per_round == pytest.approx(expected_tokens_per_si_round(a, k), rel=0.03)


def test_expected_tokens_per_round_edges() -> None:
    assert expected_tokens_per_si_round(0.0, 5) == 1.0
    assert expected_tokens_per_si_round(1.0, 5) == 6.0
    assert expected_tokens_per_si_round(0.5, 1) == 1.5


# --- DSI in the model -----------------------------------------------------------------------------


def test_dsi_with_a_perfect_drafter_is_drafter_bound() -> None:
    n = 200
    run = simulate_dsi(cfg(1.0, 5, n, sp=7), np.ones(n, bool))
    # the drafter streams every token (the first one at TTFT), the last chunk is verified once
    assert run.latency_ms == pytest.approx(n * 3.0 + 30.0)
    assert run.cancelled == 0


def test_dsi_with_a_useless_drafter_is_non_si() -> None:
    n = 50
    c = cfg(0.0, 5, n, sp=4)
    run = simulate_dsi(c, np.zeros(n, bool))
    assert run.latency_ms == pytest.approx(simulate_nonsi(c).latency_ms)
    assert run.accepted == 0
    assert run.cancelled > 0  # speculative verifications built on rejected drafts


def test_dsi_is_never_slower_than_si_or_non_si_across_a_grid() -> None:
    rng = np.random.default_rng(7)
    worst_vs_nonsi = worst_vs_si = 0.0
    for frac in (0.02, 0.1, 0.3, 0.6, 1.0):
        for a in (0.05, 0.3, 0.6, 0.9, 0.99):
            for k in (1, 3, 5):
                c = cfg(a, k, 80, sp=8, d=(30 * frac, 30 * frac))
                for _ in range(3):
                    runs = simulate_one(c, draw_coins(a, 80, rng))
                    dsi = runs["dsi"].latency_ms
                    worst_vs_nonsi = max(worst_vs_nonsi, dsi / runs["nonsi"].latency_ms)
                    worst_vs_si = max(worst_vs_si, dsi / runs["si"].latency_ms)
    assert worst_vs_nonsi <= 1.0 + 1e-9
    assert worst_vs_si <= 1.0 + 1e-9


def test_dsi_queues_drafts_when_replicas_are_few() -> None:
    """With fewer replicas than DSI needs, drafts wait (and merge into longer
    chunks); more replicas never hurt."""
    n, a = 150, 0.8
    coins = [draw_coins(a, n, np.random.default_rng(s)) for s in range(5)]
    lat = {}
    for sp in (1, 2, 4, 8):
        c = cfg(a, 2, n, sp=sp, d=(2.0, 2.0))
        lat[sp] = np.mean([simulate_dsi(c, x).latency_ms for x in coins])
    assert lat[1] > lat[2] > lat[4] >= lat[8] * 0.999
    nonsi = simulate_nonsi(cfg(a, 2, n)).latency_ms
    assert lat[1] < nonsi  # even one replica: the frontier step is never idle


def test_simulations_are_reproducible_and_use_common_draws() -> None:
    c = cfg(0.6, 3, 60)
    a = simulate_config(c, 4, seed=3, lookaheads=[1, 3, 5])
    b = simulate_config(c, 4, seed=3, lookaheads=[1, 3, 5])
    assert {s: v.mean_ms for s, v in a.items()} == {s: v.mean_ms for s, v in b.items()}
    assert a["nonsi"].lookahead == 0 and a["si"].lookahead in (1, 3, 5)


def test_links_of_a_microsecond_put_the_model_on_the_real_side_of_its_ties() -> None:
    """Target 30 ms, drafter 3 ms: with links of no latency a rejection's
    result arrives at the very instant the drafter's next step would begin
    and the restart costs no step; with any positive link the step has begun
    and runs to its end. DSI's model jumps there, its neighbours do not."""

    def dsi_ms(c: SimConfig) -> float:
        return simulate_config(c, 60, seed=0, lookaheads=[5], strategies=["dsi"])["dsi"].mean_ms

    exact = cfg(0.8, 5, 200)
    tied, linked = dsi_ms(exact), dsi_ms(exact.with_links(TIE_LINK_MS))
    assert linked > tied * 1.03, (tied, linked)
    assert linked == pytest.approx(dsi_ms(exact.with_links(0.1)), rel=0.005)  # flat beyond the tie
    assert linked == pytest.approx(dsi_ms(cfg(0.8, 5, 200, d=(2.99, 2.99))), rel=0.01)  # a drafter 0.3 % faster
    si = [
        simulate_config(c, 60, seed=0, lookaheads=[5], strategies=["si"])["si"].mean_ms
        for c in (exact, exact.with_links(TIE_LINK_MS))
    ]
    assert si[1] == pytest.approx(si[0], rel=1e-3), "SI has no such tie: only the links' time"
    assert exact.with_links(0.5).targets[0].delay_ms == 0.5 and exact.with_links(0.5).drafter.delay_ms == 0.5


def test_prefill_cost_of_catching_up_is_modelled() -> None:
    n = 60
    coins = draw_coins(0.7, n, np.random.default_rng(0))
    free = simulate_dsi(cfg(0.7, 3, n), coins).latency_ms
    t = Node(30, 30, prefill_token_ms=0.5)
    paid = simulate_dsi(SimConfig((t,) * 4, Node(3, 3), 0.7, 3, n), coins).latency_ms
    assert paid > free


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        cfg(a=1.5).check()
    with pytest.raises(ValueError):
        replace(cfg(), targets=()).check()
    with pytest.raises(ValueError):
        cfg(k=0).check()


# --- CLI ------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return int(exc.value.code or 0)


def test_cli_single_point_writes_csv_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    code = _cli(
        [
            "simulate",
            "--acceptance",
            "0.8",
            "--lookahead",
            "2,4",
            "--tokens",
            "50",
            "--repeats",
            "3",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    by = {r["strategy"]: r for r in result["strategies"]}
    assert set(by) == {"nonsi", "si", "dsi"}
    assert by["nonsi"]["latency_ms_mean"] == pytest.approx(50 * 30.0)
    assert by["dsi"]["latency_ms_mean"] <= by["si"]["latency_ms_mean"]
    rows = read_csv(out / "simulate.csv")
    assert [r["strategy"] for r in rows] == ["nonsi", "si", "dsi"]


def test_cli_grid_writes_csv_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "grid"
    code = _cli(
        [
            "simulate",
            "--grid",
            "--grid-size",
            "4,3",
            "--lookahead",
            "1,3",
            "--tokens",
            "30",
            "--repeats",
            "2",
            "--workers",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = read_csv(out / "grid.csv")
    assert len(rows) == 12
    for r in rows:
        assert 0.01 <= float(r["drafter_fraction"]) <= 1.0
        assert float(r["dsi_over_best"]) <= 1.0 + 1e-9
        assert float(r["dsi_over_si"]) == pytest.approx(float(r["dsi_ms"]) / float(r["si_ms"]), rel=1e-4)
    png = out / "grid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 400_000
    meta = json.loads((out / "grid.json").read_text())
    assert meta["grid"] == [4, 3]


# --- experiment files -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiment_files_load(path: Path) -> None:
    exp = xconfig.load(path)
    points = exp.points({"lookahead": 5, "tokens": 8, **exp.run})
    assert points
    for p in points:
        assert p.cluster.targets
        if p.cluster.synthetic:
            assert p.cluster.sim_config(p.lookahead, p.tokens, 16) is not None


def test_paper_profiles_are_all_there() -> None:
    exp = xconfig.load(EXPERIMENTS / "paper-pairs.toml")
    names = [p.name for p in exp.profiles]
    assert names == ["vicuna-13b/68m", "vicuna-7b/68m", "starcoder-15b/168m", "phi3-14b/4b"]
    assert all(p.source for p in exp.profiles)


def test_experiment_sweeps_and_delays(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text(
        """
name = "x"
[run]
tokens = 10
[[profile]]
name = "p"
targets = [{ model = "synthetic:tpot_ms=10", count = 2 },
           { model = "synthetic:tpot_ms=20", delay_ms = 1.5 }]
drafters = [{ model = "synthetic:tpot_ms=1,acceptance=0.5", delay_ms = 0.5 }]
[sweep]
sp = [1, 3]
"drafter.acceptance" = [0.2, 0.9]
"""
    )
    exp = xconfig.load(f)
    points = exp.points({"lookahead": 4, **exp.run})
    assert len(points) == 4
    p = points[-1]
    assert p.cluster.max_sp_degree == 3 and p.cluster.sp_degree == 3
    sim = p.cluster.sim_config(4, 10, 8)
    assert sim is not None
    assert sim.acceptance == 0.9
    assert [n.tpot_ms for n in sim.targets] == [10, 10, 20]
    assert [n.delay_ms for n in sim.targets] == [0, 0, 1.5]
    assert sim.drafter.delay_ms == 0.5


@pytest.mark.parametrize(
    "text,match",
    [
        ("name='x'", "needs targets"),
        ("targets = [{ model = 'synthetic:', count = 0 }]", "count"),
        ("targets = [{ model = 'synthetic:' }]\n[sweep]\nbogus = [1]", "unknown sweep key"),
        ("targets = [{ model = 'synthetic:', colour = 1 }]", "unknown key"),
        ("targets = [{ model = 'synthetic:' }]\n[run]\nstrategies = ['fast']", "unknown strategy"),
    ],
)
def test_bad_experiment_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(xconfig.ConfigError, match=match):
        xconfig.load(f)


# --- replaying a run's own draws (dsi bench's measured / replayed) ----------------------------------


@pytest.mark.parametrize(
    ("k", "spec"), [(1, "acceptance=0.6"), (3, "acceptance=0.6"), (4, "acceptance=0.9,hard_acceptance=0.2,block=8")]
)
async def test_the_drafters_draws_along_an_output_are_the_ones_si_saw(k: int, spec: str) -> None:
    """SI is deterministic given which drafts are right: the simulator
    replaying drafter_right_along's draws makes the rounds and acceptances
    the engine made on the synthetic pair."""
    from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
    from dsi.backends.synthetic import drafter_right_along
    from services.coordinator.engine import Engine, GenerationParams, Strategy

    drafter = f"synthetic:vocab=500,seed=4,{spec}"
    engine = Engine(
        [LocalTarget(load_target_model("synthetic:vocab=500,seed=4"))],
        [LocalDrafter(load_drafter_model(drafter))],
        eos_token_ids=(),
        max_context=4096,
        vocab_size=500,
    )
    prompt, n = [3, 1, 4, 1, 5], 60
    gen = engine.generate(prompt, GenerationParams(n, strategy=Strategy.SI, lookahead=k))
    output = [t async for chunk in gen.tokens() for t in chunk]
    right = drafter_right_along(drafter, prompt, output)
    assert len(right) == n and 0 < right.sum() < n
    run = simulate_si(cfg(k=k, n=n, sp=1, prompt_len=len(prompt)), right)
    assert (run.target_forwards, run.accepted, run.decided_drafts) == (
        gen.stats.target_forward_passes,
        gen.stats.accepted_tokens,
        gen.stats.decided_drafts,
    )


def test_cli_abort_passes_is_the_papers_instant_release(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--abort-passes``: a cancelled verification frees its replica at once;
    by default its pass runs to its end, which costs DSI time where a fast
    drafter keeps every replica busy at each rejection."""
    dsi_ms = {}
    for extra in ([], ["--abort-passes"]):
        argv = ["simulate", "--target-tpot", "20", "--drafter-tpot", "0.2", "--acceptance", "0.8", "--sp", "4"]
        argv += ["--lookahead", "3", "--tokens", "120", "--repeats", "4", "--json", "--out", str(tmp_path), *extra]
        assert _cli(argv) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["config"]["abort_passes"] is bool(extra)
        dsi_ms[bool(extra)] = next(r for r in result["strategies"] if r["strategy"] == "dsi")["latency_ms_mean"]
    assert dsi_ms[True] < 0.97 * dsi_ms[False], dsi_ms
