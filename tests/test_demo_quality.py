"""The loop metric of tools/demo_quality.py (the demo pair's everyday-prompt figure)."""

from __future__ import annotations

import pytest

from tools.demo_quality import EVERYDAY_PROMPTS, LOOP_MAX_PERIOD, LOOP_WINDOW, loop_period, loops


def test_a_repeated_block_of_at_most_16_tokens_loops() -> None:
    prefix = list(range(100, 132))  # 32 distinct tokens, then the loop
    for period in (1, 2, 5, 16):
        block = list(range(period))
        tail = (block * 40)[: LOOP_WINDOW + 3]  # ends part-way through a block
        assert loop_period(prefix + tail) == period
        assert loops(prefix + tail)


def test_the_smallest_period_is_reported() -> None:
    assert loop_period([7, 8] * 32) == 2  # also periodic with 4, 6, ...


def test_varied_text_and_longer_blocks_do_not_loop() -> None:
    assert not loops(list(range(64)))
    block = list(range(LOOP_MAX_PERIOD + 1))  # a 17-token block: too long to count
    assert loop_period((block * 4)[:64]) is None
    # a loop that stopped before the window: the last 32 tokens are not one repeated block
    assert not loops([1, 2] * 16 + list(range(50, 82)))
    # one different token inside the window breaks it
    seq = [3, 4] * 32
    seq[-10] = 99
    assert not loops(seq)


def test_completions_shorter_than_the_window_do_not_loop() -> None:
    assert loop_period([5] * (LOOP_WINDOW - 1)) is None
    assert loop_period([5] * LOOP_WINDOW) == 1


@pytest.mark.parametrize("prompt", EVERYDAY_PROMPTS)
def test_everyday_prompts_are_short_python(prompt: str) -> None:
    assert len(EVERYDAY_PROMPTS) == 12 and len(set(EVERYDAY_PROMPTS)) == 12
    assert 0 < len(prompt) <= 60
    compile(prompt.strip() + "\n" + " " * 8 + "pass\n" if prompt.rstrip().endswith(":") else prompt + ")", "p", "exec")
