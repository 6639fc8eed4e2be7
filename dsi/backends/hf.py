"""The Hugging Face backend: any local causal-LM directory.

Loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local path only
(never from a hub). Each session keeps a ``DynamicCache`` and the tokens it
holds; a request reuses the longest common prefix and crops the rest (the
rollback after a rejection, or the catch-up on tokens other replicas
verified). Forward passes run in one worker thread per model, off the event
loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dsi.backends.base import DrafterModel, Forward, TargetModel
from dsi.domain.errors import InvalidArgument, NotFound
from dsi.domain.types import ModelInfo, SamplingParams

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
DEFAULT_MAX_CONTEXT = 2048
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hex digest of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _eos_ids(model: Any, vocab_size: int) -> tuple[int, ...]:
    """End-of-sequence ids from the generation config, else the model config
    (ids outside the vocabulary, as in some random test configs, are dropped)."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids = eos if isinstance(eos, (list, tuple)) else [eos]
            return tuple(sorted({int(i) for i in ids if 0 <= int(i) < vocab_size}))
    return ()


def _max_context(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_CONTEXT


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Session:
    """A session's KV cache and the tokens whose keys/values it holds."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.tokens: list[int] = []


class HFCore:
    """A loaded model plus the cached forward pass both roles use."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise NotFound(f"model directory {path!r} does not exist (dsi never downloads models)")
        if not (p / "config.json").is_file():
            raise NotFound(f"{path!r} is not a Hugging Face model directory: config.json is missing")
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.torch = torch
        self.device = torch.device(device)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype, local_files_only=True)
        if dtype == "auto" and self.device.type == "cpu" and self.model.dtype in (torch.float16, torch.bfloat16):
            self.model = self.model.float()  # half precision on CPU is slow and often unsupported
        self.model.to(self.device).eval()
        # transformers renamed the forward argument and output field `past_key_values`
        # to `cache` (5.24; the old name warns until 5.40): use whichever it has.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.tokenizer: Any = None
        if any((p / f).is_file() for f in TOKENIZER_FILES):
            self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            fingerprint = tokenizer_fingerprint(self.tokenizer)
        else:  # e.g. a bare test model: services can still pair by vocabulary size
            log.info("no tokenizer files in %s; the tokenizer fingerprint stands for the vocabulary size", path)
            fingerprint = hashlib.sha256(f"no-tokenizer-vocab:{self.model.config.vocab_size}".encode()).hexdigest()[:32]
        cfg = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.info = ModelInfo(
            model_id=p.name or str(p),
            backend="hf",
            vocab_size=self.vocab_size,
            eos_token_ids=_eos_ids(self.model, self.vocab_size),
            max_context_tokens=_max_context(cfg),
            tokenizer_fingerprint=fingerprint,
            device=str(self.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            num_parameters=int(sum(t.numel() for t in self.model.parameters())),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hf-{self.info.model_id}")

    def new_state(self) -> _Session:
        return _Session()

    def drop_state(self, state: _Session) -> None:
        state.cache = None
        state.tokens = []

    def _reset(self, state: _Session) -> None:
        from transformers import DynamicCache

        state.cache = DynamicCache(config=self.model.config)
        state.tokens = []

    def forward_sync(self, state: _Session, tokens: Sequence[int], num_rows: int) -> Forward:
        """Scores for the last ``num_rows`` positions of ``tokens``; the
        session's cache ends up holding exactly ``tokens``."""
        torch = self.torch
        start = time.perf_counter()
        keep = min(_lcp(state.tokens, tokens), len(tokens) - num_rows)
        if state.cache is None or keep == 0:
            self._reset(state)
            keep = 0
        elif state.cache.get_seq_length() > keep:
            try:
                state.cache.crop(keep - state.cache.get_seq_length())
            except (RuntimeError, ValueError):  # e.g. sliding-window layers past their window
                self._reset(state)
                keep = 0
            if keep and state.cache.get_seq_length() != keep:
                self._reset(state)
                keep = 0
        state.tokens = list(tokens[:keep])  # what the cache holds now, even if the forward fails
        new = torch.tensor([list(tokens[keep:])], dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                kwargs = {self._cache_arg: state.cache}
                out = self.model(input_ids=new, use_cache=True, logits_to_keep=num_rows, **kwargs)
        except BaseException:
            self._reset(state)  # a half-updated cache must never be reused
            raise
        state.cache = getattr(out, self._cache_arg)
        state.tokens = list(tokens)
        rows = out.logits[0, -num_rows:].float().cpu().numpy()
        return Forward(rows, keep, len(tokens) - keep, time.perf_counter() - start)

    async def forward(self, state: _Session, tokens: Sequence[int], num_rows: int) -> Forward:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.forward_sync, state, list(tokens), num_rows)


class HFTarget(TargetModel):
    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto") -> None:
        self.core = HFCore(path, device, dtype)
        self.info = self.core.info

    def new_state(self) -> _Session:
        return self.core.new_state()

    def drop_state(self, state: _Session) -> None:
        self.core.drop_state(state)

    async def forward(self, state: _Session, tokens: Sequence[int], num_rows: int) -> Forward:
        return await self.core.forward(state, tokens, num_rows)


class HFDrafter(DrafterModel):
    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto") -> None:
        self.core = HFCore(path, device, dtype)
        self.info = self.core.info

    def new_state(self) -> _Session:
        return self.core.new_state()

    def drop_state(self, state: _Session) -> None:
        self.core.drop_state(state)

    async def next_scores(
        self, state: _Session, tokens: Sequence[int], params: SamplingParams, seed: int
    ) -> tuple[np.ndarray, Forward]:
        fwd = await self.core.forward(state, tokens, 1)
        return fwd.rows[0], fwd
