"""Pieces of tools/train_demo_models.py that the shipped pair's training relied on."""

from __future__ import annotations

import pytest

from tools.train_demo_models import QUICK, drafter_from_target, llama, reproduce_commands, unlikelihood_loss


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


def test_a_drafter_made_later_is_the_last_command_and_replaces_the_old_ones_runs() -> None:
    report = {
        "command": "a",
        "drafter_training": {"command": "e", "at": "2026-12-03T09:00:00Z", "init_layers": [0, 4]},
        "target_training_more": [{"command": "c", "at": "2026-12-03T07:00:00Z"}],
    }
    assert reproduce_commands(report) == ["a", "c", "e"]


def test_a_drafter_cut_from_the_target_keeps_its_embedding_norm_and_chosen_layers() -> None:
    torch = pytest.importorskip("torch")
    target = llama(QUICK.target, QUICK, seed=0).eval()  # 2 layers
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        whole = drafter_from_target(target, [0, 1]).eval()
        assert torch.equal(whole(input_ids=x).logits, target(input_ids=x).logits), "all layers: the target itself"
        cut = drafter_from_target(target, [1]).eval()
        assert cut.config.num_hidden_layers == 1 and len(cut.model.layers) == 1
        kept = dict(cut.model.layers[0].named_parameters())
        for name, weight in target.model.layers[1].named_parameters():
            assert torch.equal(kept[name], weight), name
        assert torch.equal(cut.model.embed_tokens.weight, target.model.embed_tokens.weight)
        assert cut.model.embed_tokens.weight.data_ptr() != target.model.embed_tokens.weight.data_ptr(), "a copy"
        assert not torch.equal(cut(input_ids=x).logits, target(input_ids=x).logits)
        out = cut.generate(x, max_new_tokens=3, do_sample=False)  # its KV cache works with one layer
        assert out.shape == (1, 8)
    with pytest.raises(ValueError, match=r"layers must be in 0\.\.1"):
        drafter_from_target(target, [2])


def test_target_continuations_are_prompts_from_the_stream_continued_by_the_target() -> None:
    torch = pytest.importorskip("torch")
    import numpy as np

    from tools.train_demo_models import target_continuations

    target = llama(QUICK.target, QUICK, seed=0).eval()
    stream = np.arange(1, 400, dtype=np.int32) % QUICK.vocab
    data, made = target_continuations(target, stream, seed=3, minutes=1e-9, prompt=8, new=5, batch=4)
    assert made["samples"] == 4 and made["tokens"] == len(data) == 4 * (8 + 5 + 1)
    samples = data.reshape(4, 14)
    assert (samples[:, -1] == 0).all(), "each sample ends with EOS"
    for row in samples:
        start = int(np.flatnonzero(stream == row[0])[0])
        assert (row[:8] == stream[start : start + 8]).all(), "the prompt is a window of the stream"
    greedy = samples[0]  # the first batch is greedy: the target's own argmax continuation
    with torch.no_grad():
        again = target.generate(torch.tensor(greedy[None, :8].astype(np.int64)), max_new_tokens=5, do_sample=False)
    assert (again[0, 8:].numpy() == greedy[8:13]).all()
