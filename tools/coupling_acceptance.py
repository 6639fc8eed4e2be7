"""Per-token acceptance of a drafter/target pair under three decision rules.

Walks along text the target samples after each prompt and, at every position,
computes from the two models' full distributions:

- ``rejection``: sum(min(p, q)), the acceptance of speculative rejection
  sampling with the drafter's full distribution (the optimum of any rule);
- ``rejection-top-K``: the same with ``q`` truncated to its K most likely
  tokens (what a drafter that sends sparse distributions can offer; dsi did
  this with K=64 before it switched rules);
- ``gumbel``: P(argmax(log p + G) == argmax(log q + G)) with shared Gumbel
  noise G, dsi's rule (docs/architecture.md, "The decision rule"), by Monte
  Carlo.

    python tools/coupling_acceptance.py --target models/pycoder-5m --drafter models/pycoder-2m-drafter

Prompts default to the held-out prompts listed in models/eval.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(ROOT / "models" / "pycoder-5m"))
    p.add_argument("--drafter", default=str(ROOT / "models" / "pycoder-2m-drafter"))
    p.add_argument(
        "--prompts", default=str(ROOT / "models" / "eval.json"), help="eval.json or a text file, one per line"
    )
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--positions", type=int, default=32, help="sampled positions per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=64, help="truncation of q for the rejection-top-K column")
    p.add_argument("--draws", type=int, default=300, help="Monte Carlo draws of the noise per position")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(args.target, local_files_only=True).float().eval()
    drafter = AutoModelForCausalLM.from_pretrained(args.drafter, local_files_only=True).float().eval()
    tok = AutoTokenizer.from_pretrained(args.target, local_files_only=True)
    path = Path(args.prompts)
    prompts = json.loads(path.read_text())["prompts"] if path.suffix == ".json" else path.read_text().splitlines()
    rng = np.random.default_rng(args.seed)
    sums = {"rejection": 0.0, f"rejection-top-{args.top_k}": 0.0, "gumbel": 0.0}
    n = 0
    for prompt in prompts[: args.num_prompts]:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            for _ in range(args.positions):
                lp = torch.log_softmax(target(ids).logits[0, -1].double() / args.temperature, -1).numpy()
                lq = torch.log_softmax(drafter(ids).logits[0, -1].double() / args.temperature, -1).numpy()
                pp, q = np.exp(lp), np.exp(lq)
                top = np.argsort(-q)[: args.top_k]
                qt = np.zeros_like(q)
                qt[top] = q[top] / q[top].sum()
                sums["rejection"] += float(np.minimum(pp, q).sum())
                sums[f"rejection-top-{args.top_k}"] += float(np.minimum(pp, qt).sum())
                g = rng.gumbel(size=(args.draws, pp.size))
                sums["gumbel"] += float(np.mean(np.argmax(lp + g, 1) == np.argmax(lq + g, 1)))
                n += 1
                nxt = int(np.argmax(lp + rng.gumbel(size=pp.size)))  # the target's own sample
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    print(
        json.dumps({"positions": n, "temperature": args.temperature, **{k: round(v / n, 4) for k, v in sums.items()}})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
