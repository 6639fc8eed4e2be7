"""Which token-tree shapes pay off for a drafter/target pair: tokens accepted
per target pass against the tree's size, for chains, dsi's main path with
alternatives (``WxD``), and SpecInfer expansion configurations (``<k1,...,kd>``).

Under dsi's decision rule (docs/architecture.md) the target's token at each
position is ``argmax(log p + G)`` and a drafter's guesses are the best-ranked
tokens of ``log q + G`` with the same noise ``G``. The path a verification
accepts is therefore the target's own text, as deep as the tree contains it.
So it is enough to know, at every position of text the target samples, the
rank ``r`` of the target's token among the drafter's noisy guesses (0 = its
best guess), which one forward pass of each model over the text gives:

- chain of k: the run of positions with r = 0, at most k;
- ``WxD`` (k main positions): the run of r = 0; at its end, if r < W an
  alternative matches, and its branch adds the following positions with r = 0,
  at most D - 1;
- ``<k1,...,kd>``: the run of positions whose r is below that depth's k.

Each verification then commits the accepted tokens plus one (the target's
token after them).

    python tools/tree_shapes.py                                  # the demo pair, sampled at T=1
    python tools/tree_shapes.py --temperature 0                  # greedy
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ranks_along(drafter_logp: np.ndarray, noise: np.ndarray, text: Sequence[int]) -> np.ndarray:
    """The rank of each text token among the drafter's noisy scores."""
    scores = drafter_logp + noise
    chosen = scores[np.arange(len(text)), text]
    return (scores > chosen[:, None]).sum(axis=1)


def accepted_chain(r: np.ndarray, p: int, k: int) -> int:
    n = 0
    while n < k and p + n < len(r) and r[p + n] == 0:
        n += 1
    return n


def accepted_main_with_alternatives(r: np.ndarray, p: int, k: int, width: int, depth: int) -> int:
    n = accepted_chain(r, p, k)
    if n == k or p + n >= len(r) or r[p + n] >= width:
        return n
    return n + 1 + accepted_chain(r, p + n + 1, depth - 1)  # the alternative, then its branch


def accepted_expansion(r: np.ndarray, p: int, ks: Sequence[int]) -> int:
    n = 0
    while n < len(ks) and p + n < len(r) and r[p + n] < ks[n]:
        n += 1
    return n


def expansion_nodes(ks: Sequence[int]) -> int:
    total, level = 0, 1
    for k in ks:
        level *= k
        total += level
    return total


SHAPES: list[tuple[str, dict]] = [
    *((f"chain {k}", {"kind": "chain", "k": k}) for k in (3, 5, 8)),
    *(
        (f"{w}x{d}, 5 main", {"kind": "alt", "k": 5, "w": w, "d": d})
        for w, d in ((2, 1), (2, 3), (3, 1), (3, 3), (4, 2))
    ),
    *(
        (f"<{','.join(map(str, ks))}>", {"kind": "expand", "ks": ks})
        for ks in ((2, 2, 2, 2), (1, 1, 3, 1, 1), (3, 1, 1, 1, 1), (2, 2, 1, 1, 1, 1), (4, 2, 1, 1))
    ),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(ROOT / "models" / "pycoder-5m"))
    ap.add_argument("--drafter", default=str(ROOT / "models" / "pycoder-2m-drafter"))
    ap.add_argument("--prompts", default=str(ROOT / "models" / "eval.json"), help="eval.json or one prompt per line")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="tokens the target samples after each prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(args.target, local_files_only=True).float().eval()
    drafter = AutoModelForCausalLM.from_pretrained(args.drafter, local_files_only=True).float().eval()
    tok = AutoTokenizer.from_pretrained(args.target, local_files_only=True)
    path = Path(args.prompts)
    prompts = json.loads(path.read_text())["prompts"] if path.suffix == ".json" else path.read_text().splitlines()
    rng = np.random.default_rng(args.seed)
    temp = max(args.temperature, 1e-6)
    all_ranks = []
    for prompt in prompts[: args.num_prompts]:
        ids = tok.encode(prompt)
        with torch.no_grad():
            out = target.generate(
                torch.tensor([ids]),
                max_new_tokens=args.tokens,
                do_sample=args.temperature > 0,
                temperature=temp if args.temperature > 0 else None,
                top_k=0 if args.temperature > 0 else None,
                top_p=1.0 if args.temperature > 0 else None,
                pad_token_id=0,
            )[0].tolist()
            text = out[len(ids) :]
            seq = torch.tensor([out])
            lp = torch.log_softmax(target(seq).logits[0, len(ids) - 1 : -1].double() / temp, -1).numpy()
            lq = torch.log_softmax(drafter(seq).logits[0, len(ids) - 1 : -1].double() / temp, -1).numpy()
        if args.temperature > 0:
            # The noise that makes the target's text its Gumbel-max choice: sample G given the argmax
            # (truncated Gumbel), so the drafter's guesses see the same G (the coupling).
            noise = np.empty_like(lp)
            for j, x in enumerate(text):
                top = rng.gumbel() + np.logaddexp.reduce(lp[j])  # max of log p + G is Gumbel at logsumexp
                g = rng.gumbel(size=lp.shape[1]) + lp[j]
                g = -np.logaddexp(-top, -g)  # each other score conditioned to lie below the max
                g[x] = top
                noise[j] = g - lp[j]
        else:
            noise = np.zeros_like(lp)
        all_ranks.append(ranks_along(lq, noise, text))
    rows = []
    for name, s in SHAPES:
        acc = []
        for r in all_ranks:
            for p in range(len(r)):
                if s["kind"] == "chain":
                    acc.append(accepted_chain(r, p, s["k"]))
                elif s["kind"] == "alt":
                    acc.append(accepted_main_with_alternatives(r, p, s["k"], s["w"], s["d"]))
                else:
                    acc.append(accepted_expansion(r, p, s["ks"]))
        nodes = {
            "chain": lambda s: s["k"],
            "alt": lambda s: s["k"] * (1 + (s["w"] - 1) * s["d"]),
            "expand": lambda s: expansion_nodes(s["ks"]),
        }[s["kind"]](s)
        rows.append({"shape": name, "nodes": nodes, "tokens_per_pass": round(float(np.mean(acc)) + 1, 3)})
    top1 = float(np.mean([np.mean(r == 0) for r in all_ranks]))
    top2 = float(np.mean([np.mean(r < 2) for r in all_ranks]))
    top4 = float(np.mean([np.mean(r < 4) for r in all_ranks]))
    print(f"positions: {sum(len(r) for r in all_ranks)}, T={args.temperature}")
    print(f"target's token among the drafter's best 1 / 2 / 4 guesses: {top1:.3f} / {top2:.3f} / {top4:.3f}")
    print(f"{'shape':>22} {'nodes':>6} {'tokens/pass':>12}")
    for r in rows:
        print(f"{r['shape']:>22} {r['nodes']:>6} {r['tokens_per_pass']:>12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
