"""``dsi bench --load`` (issue 17): the load grid on the synthetic GPU-like
profile, on a virtual clock."""

from __future__ import annotations

from pathlib import Path

from dsi.tools.experiments import load
from services.coordinator.engine import Strategy


def test_batching_multiplies_throughput_at_a_bounded_latency_cost(tmp_path: Path) -> None:
    setup = load.LoadSetup(
        load.GPU_LIKE_TARGET,
        load.GPU_LIKE_DRAFTER,
        replicas=2,
        tokens=16,
        generations=1,
        lookahead=4,
        prompt_len=8,
        max_batch=16,
    )
    points = load.run_grid(setup, [Strategy.NONSI, Strategy.DSI], [1, 16], [False, True], progress=False)
    by = {(p.strategy, p.concurrency, p.batched): p for p in points}
    lone = by[("nonsi", 1, False)]
    assert abs(lone.token_ms_p50 - 30.0) < 1e-9  # tpot_ms, exactly: a virtual clock
    assert abs(by[("nonsi", 1, True)].tokens_per_s - lone.tokens_per_s) < 1e-6  # one generation: nothing to batch
    un, bat = by[("nonsi", 16, False)], by[("nonsi", 16, True)]
    assert bat.tokens_per_s >= 5.5 * un.tokens_per_s  # 8 per replica: 8 / (1 + 0.05 * 7) = 5.9
    assert bat.token_ms_p50 <= 2 * lone.token_ms_p50
    assert bat.batched_requests > 0 and un.batched_requests == 0
    for n in (1, 16):  # DSI at least as good as non-SI
        assert by[("dsi", n, True)].tokens_per_s >= 0.97 * by[("nonsi", n, True)].tokens_per_s
    load.plot(points, tmp_path / "load.png", "test")
    assert (tmp_path / "load.png").stat().st_size > 1000
    assert "| dsi | yes | 16 |" in load.report_md(setup, points)
