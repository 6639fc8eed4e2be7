"""The engine's DSI schedule against the event model of its rules
(dsi.tools.experiments.simulate), both on virtual time: where the drafter is
barely faster than the replicas' verification rate, drafting hits its lead
limit again and again, and a Draft stream that ended because it delivered all
it was asked for must be restarted at once, not at the next commit (it was:
DSI at lookahead 1 took 1.25x the model's time)."""

from __future__ import annotations

import numpy as np
import pytest

from dsi.domain.types import CHAIN
from dsi.tools.experiments.engine_sim import simulate_engine
from dsi.tools.experiments.simulate import Node, SimConfig, draw_coins, simulate_dsi


@pytest.mark.parametrize("lookahead", [1, 2, 4])
def test_dsi_engine_keeps_the_models_pace_when_drafting_hits_its_lead_limit(lookahead: int) -> None:
    target, drafter = Node(20.0, 20.0), Node(4.16, 4.16)
    cfg = SimConfig((target,) * 4, drafter, acceptance=0.99, lookahead=lookahead, tokens=64)
    rng = np.random.default_rng(0)
    model = np.mean([simulate_dsi(cfg, draw_coins(cfg.acceptance, cfg.tokens, rng)).latency_ms for _ in range(6)])
    engine = np.mean([r.latency_ms for r in simulate_engine(cfg, ["dsi"], 3, 0, CHAIN)["dsi"]])
    assert engine <= 1.05 * model, f"engine {engine:.1f} ms vs model {model:.1f} ms"
    assert engine >= 0.9 * model  # the model is the engine's rules without overhead: not beaten by much
