"""Pieces of tools/train_demo_models.py that the shipped pair's training relied on."""

from __future__ import annotations

import pytest

from tools.train_demo_models import QUICK, llama, reproduce_commands, unlikelihood_loss


def test_unlikelihood_adds_a_penalty_on_recent_tokens_only() -> None:
    torch = pytest.importorskip("torch")
    model = llama(QUICK.target, QUICK, seed=0).eval()
    x = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        plain = model(input_ids=x, labels=x).loss
        assert torch.allclose(unlikelihood_loss(model, x, 0.0, 4), plain)  # alpha 0: the usual loss
        penalised = unlikelihood_loss(model, x, 1.0, 4)
        assert penalised > plain
        # a window of 1 penalises only the current token (never the true next one): less than a window of 4
        assert plain < unlikelihood_loss(model, x, 1.0, 1) < penalised


def test_reproduce_commands_in_the_order_they_ran() -> None:
    report = {
        "command": "a",
        "drafter_training_more": [{"command": "b"}, {"command": "d", "at": "2026-12-03T08:00:00Z"}],
        "target_training_more": [{"command": "c", "at": "2026-12-03T07:00:00Z"}],
    }
    assert reproduce_commands(report) == ["a", "b", "c", "d"]
