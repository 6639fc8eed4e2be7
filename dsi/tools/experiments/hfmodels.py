"""Random-weight Hugging Face models for latency experiments (nothing is
downloaded: the weights come from a config object and a seed).

    python -m dsi.tools.experiments.hfmodels DIR [--size small|tiny]

writes ``DIR/target`` (a Llama-architecture causal LM) and ``DIR/drafter``: the
target's embeddings, its first layer and its head (an early-exit drafter with
the target's own weights). With plain random weights the two would almost never
agree, so the target's later layers have their output projections scaled by
``--damping`` (0.05: about 60% greedy agreement; 1: none): the drafter then
predicts the target's token often, as a real drafter does. Both share one
vocabulary; no tokenizer is written (prompts are token ids, the vocabulary
fingerprint falls back to the vocabulary size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SIZES = {
    # ~34M parameters: small enough for a 2-core CPU, big enough that a forward pass costs milliseconds
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
    # ~0.5M parameters: for tests
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def build(
    root: Path, size: str = "small", seed: int = 0, drafter_layers: int = 1, damping: float = 0.05
) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(SIZES[size])
    cfg = LlamaConfig(max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in target.model.layers[drafter_layers:]:
            layer.self_attn.o_proj.weight.mul_(damping)
            layer.mlp.down_proj.weight.mul_(damping)
    dcfg = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": drafter_layers})
    drafter = LlamaForCausalLM(dcfg).eval()
    own = drafter.state_dict()
    drafter.load_state_dict({k: v for k, v in target.state_dict().items() if k in own})
    out = {"target": root / "target", "drafter": root / "drafter"}
    target.save_pretrained(out["target"])
    drafter.save_pretrained(out["drafter"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsi.tools.experiments.hfmodels", description=__doc__)
    p.add_argument("dir", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drafter-layers", type=int, default=1)
    p.add_argument("--damping", type=float, default=0.05, help="scale of the later layers' outputs (default: 0.05)")
    args = p.parse_args(argv)
    paths = build(args.dir, args.size, args.seed, args.drafter_layers, args.damping)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
