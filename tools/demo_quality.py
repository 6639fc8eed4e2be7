#!/usr/bin/env python3
"""How the demo pair writes on everyday prompts: greedy completions of 12 short
Python prompts, and whether each one loops.

A completion **loops** when its last ``LOOP_WINDOW`` (32) tokens are one block of
at most ``LOOP_MAX_PERIOD`` (16) tokens repeated: for some period ``p`` in 1..16,
``t[i] == t[i + p]`` for every ``i`` in the window with ``i + p`` still in it
(the window may end part-way through a block). A completion shorter than the
window (it ended with the end-of-text token) does not loop.

::

    python tools/demo_quality.py --models models            # print the figures
    python tools/demo_quality.py --models models --write    # also store them in eval.json and the cards

The completions are the target's own greedy decoding (``transformers``
``generate``), which is what every dsi strategy outputs for them (losslessness).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

LOOP_WINDOW = 32
LOOP_MAX_PERIOD = 16
NEW_TOKENS = 64

# Chosen before the current pair was trained, and not changed after seeing its output.
EVERYDAY_PROMPTS = [
    "def fibonacci(n):",
    "def is_prime(n):",
    "def factorial(n):",
    "def read_file(path):",
    "def count_words(text):",
    "class Stack:\n    def __init__(self):",
    "class Point:\n    def __init__(self, x, y):",
    "import os\n\n\ndef list_files(directory):",
    "def main():\n    parser = argparse.ArgumentParser(",
    "for i in range(10):",
    "with open(filename) as f:",
    "    def __repr__(self):",
]


def loop_period(tokens: Sequence[int], window: int = LOOP_WINDOW, max_period: int = LOOP_MAX_PERIOD) -> int | None:
    """The smallest period ``p <= max_period`` of the last ``window`` tokens, or
    None when they are not periodic (or fewer than ``window`` tokens)."""
    if len(tokens) < window:
        return None
    tail = list(tokens[-window:])
    for p in range(1, max_period + 1):
        if all(tail[i] == tail[i + p] for i in range(window - p)):
            return p
    return None


def loops(tokens: Sequence[int], window: int = LOOP_WINDOW, max_period: int = LOOP_MAX_PERIOD) -> bool:
    return loop_period(tokens, window, max_period) is not None


def everyday_eval(target_dir: Path, prompts: Sequence[str] = EVERYDAY_PROMPTS, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy completions of ``prompts`` by the target, each with its loop period."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32, local_files_only=True).eval()
    rows = []
    for prompt in prompts:
        ids = tok.encode(prompt)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        new = out[0, len(ids) :].tolist()
        rows.append({"prompt": prompt, "completion": tok.decode(new), "loop_period": loop_period(new)})
    return {
        "definition": (
            f"greedy {new_tokens}-token completion whose last {LOOP_WINDOW} tokens are one block of at most"
            f" {LOOP_MAX_PERIOD} tokens repeated (tools/demo_quality.py: loop_period)"
        ),
        "new_tokens": new_tokens,
        "loop_window": LOOP_WINDOW,
        "loop_max_period": LOOP_MAX_PERIOD,
        "loops": sum(r["loop_period"] is not None for r in rows),
        "prompts": len(rows),
        "completions": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / "models", help="the pair's folder (default: %(default)s)")
    ap.add_argument(
        "--write", action="store_true", help="store the figures in <models>/eval.json and re-render the model cards"
    )
    args = ap.parse_args(argv)
    report_path = args.models / "eval.json"
    report = json.loads(report_path.read_text())
    result = everyday_eval(args.models / report["models"]["target"]["name"])
    for row in result["completions"]:
        mark = f"LOOPS (period {row['loop_period']})" if row["loop_period"] else "ok"
        print(f"--- {row['prompt']!r}: {mark}\n{row['prompt']}{row['completion']}\n")
    print(f"{result['loops']}/{result['prompts']} greedy completions loop ({result['definition']})")
    if args.write:
        from tools.train_demo_models import write_cards

        report["everyday"] = result
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_cards(args.models, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
