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
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dsi.backends.base import DrafterModel, DraftItem, Forward, TargetModel
from dsi.backends.batching import BatchItem
from dsi.domain import sampling
from dsi.domain.errors import InvalidArgument, NotFound
from dsi.domain.types import ROOT, Decision, ModelInfo, SamplingParams, VerifyRequest

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
            host=socket.gethostname(),
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

    def _reuse(self, state: _Session, tokens: Sequence[int], most: int) -> int:
        """Keep the cached prefix shared with ``tokens`` (at most ``most``
        tokens), crop the rest; returns how many tokens the cache holds."""
        keep = min(_lcp(state.tokens, tokens), most)
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
        return keep

    def _run(self, state: _Session, new: list[int], rows: int, **kwargs: Any) -> Any:
        """The model over ``new`` after the cache; the last ``rows`` rows of
        logits, a tensor left on the device (decisions are made there)."""
        torch = self.torch
        ids = torch.tensor([new], dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids, use_cache=True, logits_to_keep=rows, **{self._cache_arg: state.cache}, **kwargs
                )
        except BaseException:
            self._reset(state)  # a half-updated cache must never be reused
            raise
        state.cache = getattr(out, self._cache_arg)
        if self.device.type == "cuda":  # the pass's time is measured: wait for its kernels
            torch.cuda.synchronize(self.device)
        return out.logits[0, -rows:]

    def forward_sync(self, state: _Session, tokens: Sequence[int], num_rows: int) -> Forward:
        """Scores for the last ``num_rows`` positions of ``tokens``; the
        session's cache ends up holding exactly ``tokens``."""
        start = time.perf_counter()
        keep = self._reuse(state, tokens, len(tokens) - num_rows)
        rows = self._run(state, list(tokens[keep:]), num_rows)
        state.tokens = list(tokens)
        return Forward(rows, keep, len(tokens) - keep, time.perf_counter() - start)

    def forward_tree_sync(
        self, state: _Session, context: Sequence[int], tokens: Sequence[int], parents: Sequence[int]
    ) -> Forward:
        """Scores after the context and after every node of a token tree, in
        one pass: each node attends to the context and its ancestors (a 4D
        attention mask) at the position of its depth. The cache then holds
        the context and every node, in order, until :meth:`keep_path_sync`."""
        torch = self.torch
        start = time.perf_counter()
        n, ctx = len(tokens), len(context)
        keep = self._reuse(state, context, ctx - 1)
        new = [*context[keep:], *tokens]
        m = ctx - keep  # context tokens to compute (at least the last one: its row follows the context)
        depth = [0] * n
        ancestors = torch.zeros((n, n), dtype=torch.bool)
        for i, p in enumerate(parents):
            depth[i] = 1 if p == ROOT else depth[p] + 1
            if p != ROOT:
                ancestors[i] = ancestors[p]
            ancestors[i, i] = True
        allowed = torch.zeros((m + n, ctx + n), dtype=torch.bool)
        allowed[:m, :ctx] = torch.ones((m, ctx), dtype=torch.bool).tril(diagonal=keep)
        allowed[m:, :ctx] = True
        allowed[m:, ctx:] = ancestors
        dtype = self.model.dtype
        mask = torch.zeros((1, 1, m + n, ctx + n), dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        positions = torch.tensor([[*range(keep, ctx), *(ctx - 1 + d for d in depth)]], dtype=torch.long)
        rows = self._run(state, new, n + 1, attention_mask=mask.to(self.device), position_ids=positions.to(self.device))
        state.tokens = [*context, *([-1] * n)]  # not a sequence: only the context is reusable as it is
        return Forward(rows, keep, m + n, time.perf_counter() - start)

    def keep_path_sync(
        self, state: _Session, context: Sequence[int], path_tokens: Sequence[int], path: Sequence[int]
    ) -> None:
        """Keep the context and the accepted path of the tree in the cache
        (the keys and values of those nodes, which saw exactly their
        ancestors), dropping the other nodes."""
        from transformers.cache_utils import DynamicLayer

        torch = self.torch
        ctx = len(context)
        layers = getattr(state.cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            self._reuse(state, context, ctx)  # another cache layout: keep the context, recompute the path later
            return
        index = torch.tensor([*range(ctx), *(ctx + i for i in path)], dtype=torch.long, device=self.device)
        for layer in layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, index)
                layer.values = layer.values.index_select(-2, index)
        state.tokens = [*context, *path_tokens]

    # --- batching (issue 17): several sessions in one pass ---------------------------

    def tokens_to_compute(self, state: _Session, tokens: Sequence[int], num_rows: int) -> int:
        return len(tokens) - min(_lcp(state.tokens, tokens), len(tokens) - num_rows)

    def _batchable(self, state: _Session) -> bool:
        """Whether the session's cache can be stacked with others' (plain
        ``DynamicLayer`` layers only: sliding-window and other layouts run alone)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(state.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def forward_batch_sync(self, items: Sequence[BatchItem]) -> list[Forward]:
        """:meth:`forward_sync` for several sessions in one forward pass.

        Layout: each session's cached keys/values (``L_i`` tokens) are
        left-padded to the longest (``L``) and stacked into one batch cache;
        its new tokens (``n_i``) are right-padded to the longest (``n``). A 2D
        attention mask hides the padding (ones on ``[L - L_i, L + n_i)``), and
        position ids continue each session's own sequence (``L_i + j``), so
        every real position computes what it would alone. Afterwards each
        session's slice ``[L - L_i, L + n_i)`` of the batch cache becomes its
        own cache again. Sessions whose caches are not plain dynamic layers
        fall back to one pass each."""
        if len(items) == 1:
            return [self.forward_sync(items[0].state, items[0].tokens, items[0].num_rows)]
        torch = self.torch
        start = time.perf_counter()
        keeps = [self._reuse(i.state, i.tokens, len(i.tokens) - i.num_rows) for i in items]
        if not all(self._batchable(i.state) for i in items):
            return [self.forward_sync(i.state, i.tokens, i.num_rows) for i in items]
        from transformers import DynamicCache

        news = [list(i.tokens[k:]) for i, k in zip(items, keeps, strict=True)]
        b, past, width = len(items), max(keeps), max(len(n) for n in news)
        layers = len(items[0].state.cache.layers)
        batch_cache = DynamicCache(config=self.model.config)
        if past:
            donor = next(i.state.cache.layers for i, k in zip(items, keeps, strict=True) if k)
            for li in range(layers):
                shape = (b, donor[li].keys.shape[1], past, donor[li].keys.shape[3])
                keys = donor[li].keys.new_zeros(shape)
                values = donor[li].values.new_zeros((*shape[:3], donor[li].values.shape[3]))
                for row, (item, k) in enumerate(zip(items, keeps, strict=True)):
                    if k:
                        layer = item.state.cache.layers[li]
                        keys[row, :, past - k :] = layer.keys[0]
                        values[row, :, past - k :] = layer.values[0]
                batch_cache.layers[li].update(keys, values)
        ids = torch.zeros((b, width), dtype=torch.long)
        mask = torch.zeros((b, past + width), dtype=torch.long)
        positions = torch.zeros((b, width), dtype=torch.long)
        for row, (new, k) in enumerate(zip(news, keeps, strict=True)):
            ids[row, : len(new)] = torch.tensor(new, dtype=torch.long)
            mask[row, past - k : past + len(new)] = 1
            positions[row] = torch.arange(k, k + width)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    use_cache=True,
                    logits_to_keep=width,
                    **{self._cache_arg: batch_cache},
                )
            cache = getattr(out, self._cache_arg)
            logits = out.logits[:, -width:]  # left on the device, like forward_sync's (decided there)
            results = []
            for row, (item, new, k) in enumerate(zip(items, news, keeps, strict=True)):
                own = DynamicCache(config=self.model.config)
                for li in range(layers):
                    src = cache.layers[li]
                    own.layers[li].update(
                        src.keys[row : row + 1, :, past - k : past + len(new)].clone(),
                        src.values[row : row + 1, :, past - k : past + len(new)].clone(),
                    )
                item.state.cache = own
                item.state.tokens = list(item.tokens)
                rows = logits[row, len(new) - item.num_rows : len(new)]
                results.append(Forward(rows, k, len(new), 0.0))
        except BaseException:
            for item in items:
                self._reset(item.state)  # a half-updated cache must never be reused
            raise
        if self.device.type == "cuda":  # the pass's time is measured: wait for its kernels
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return [Forward(r.scores, r.cached_tokens, r.computed_tokens, seconds) for r in results]

    async def forward_batch(self, items: Sequence[BatchItem]) -> list[Forward]:
        return await self.run_in_executor(self.forward_batch_sync, list(items))

    async def run_in_executor(self, fn: Any, *args: Any) -> Any:
        """Model work runs in this model's one worker thread, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def forward(self, state: _Session, tokens: Sequence[int], num_rows: int) -> Forward:
        return await self.run_in_executor(self.forward_sync, state, list(tokens), num_rows)


class DeviceDecisions:
    """Decisions made with torch on the model's device
    (:mod:`dsi.backends.torch_sampling`), in the model's worker thread: only
    token ids reach the host. ``host_bytes`` counts what the decisions
    read on the host: ids, or whole float32 rows when deciding there (on a
    GPU, a copy; on the CPU, a view of the same memory)."""

    def __init__(self, core: HFCore, on_device: bool | None) -> None:
        from dsi.backends import torch_sampling

        self.core = core
        if on_device is None:  # on the CPU the rows already are on the host, and numpy decides them faster
            on_device = core.device.type != "cpu" and torch_sampling.supported(core.device)
        self.on_device = on_device
        if self.on_device and not torch_sampling.supported(core.device):
            raise InvalidArgument(f"decisions cannot run on {core.device} (no float64): decide on the host")
        self.host_bytes = 0

    def verify_sync(self, request: VerifyRequest, fwd: Forward) -> tuple[list[Decision], list[int], int]:
        from dsi.backends import torch_sampling

        if not self.on_device or isinstance(fwd.scores, np.ndarray):
            rows = fwd.rows
            self.host_bytes += rows.nbytes
            return sampling.verify_rows(rows, request.drafts, request.sampling, request.seed, len(request.context))
        moved: list[int] = []
        with self.core.torch.inference_mode():
            out = torch_sampling.verify_scores(
                fwd.scores, request.drafts, request.sampling, request.seed, len(request.context), moved
            )
        self.host_bytes += sum(moved)
        return out

    def candidates_sync(self, scores: Any, params: SamplingParams, seed: int, position: int, k: int) -> list[int]:
        from dsi.backends import torch_sampling

        if not self.on_device or isinstance(scores, np.ndarray):
            row = scores if isinstance(scores, np.ndarray) else scores.float().cpu().numpy()
            self.host_bytes += row.nbytes
            return sampling.top_candidates(row, params, seed, position, k)
        with self.core.torch.inference_mode():
            out = torch_sampling.top_candidates(scores, params, seed, position, k)
        self.host_bytes += 8 * len(out)
        return out


class HFTarget(TargetModel):
    def __init__(
        self, path: str, device: str = "cpu", dtype: str = "auto", decide_on_device: bool | None = None
    ) -> None:
        """``decide_on_device``: None = on accelerators that can (CUDA, not
        MPS); on the CPU the host's numpy decides."""
        self.core = HFCore(path, device, dtype)
        self.info = self.core.info
        self.decisions = DeviceDecisions(self.core, decide_on_device)
        self.decides_on_device = self.decisions.on_device

    async def decide(self, request: VerifyRequest, fwd: Forward) -> tuple[list[Decision], list[int], int]:
        return await self.core.run_in_executor(self.decisions.verify_sync, request, fwd)

    def new_state(self) -> _Session:
        return self.core.new_state()

    def drop_state(self, state: _Session) -> None:
        self.core.drop_state(state)

    async def forward(self, state: _Session, tokens: Sequence[int], num_rows: int) -> Forward:
        return await self.core.forward(state, tokens, num_rows)

    async def forward_tree(
        self, state: _Session, context: Sequence[int], tokens: Sequence[int], parents: Sequence[int]
    ) -> Forward:
        return await self.core.run_in_executor(
            self.core.forward_tree_sync, state, list(context), list(tokens), list(parents)
        )

    async def keep_path(
        self, state: _Session, context: Sequence[int], path_tokens: Sequence[int], path: Sequence[int]
    ) -> None:
        core = self.core
        await core.run_in_executor(core.keep_path_sync, state, list(context), list(path_tokens), list(path))

    async def forward_batch(self, items: list[BatchItem]) -> list[Forward]:
        return await self.core.forward_batch(items)

    def tokens_to_compute(self, state: _Session, tokens: Sequence[int], num_rows: int) -> int:
        return self.core.tokens_to_compute(state, tokens, num_rows)


class HFDrafter(DrafterModel):
    def __init__(
        self, path: str, device: str = "cpu", dtype: str = "auto", decide_on_device: bool | None = None
    ) -> None:
        self.core = HFCore(path, device, dtype)
        self.info = self.core.info
        self.decisions = DeviceDecisions(self.core, decide_on_device)

    def new_state(self) -> _Session:
        return self.core.new_state()

    def drop_state(self, state: _Session) -> None:
        self.core.drop_state(state)

    async def next_scores(
        self, state: _Session, tokens: Sequence[int], params: SamplingParams, seed: int
    ) -> tuple[np.ndarray, Forward]:
        fwd = await self.core.forward(state, tokens, 1)
        return fwd.rows[0], fwd

    def _candidates_sync(
        self, state: _Session, tokens: list[int], params: SamplingParams, seed: int, k: int
    ) -> tuple[list[int], Forward]:
        fwd = self.core.forward_sync(state, tokens, 1)
        return self.decisions.candidates_sync(fwd.scores[0], params, seed, len(tokens), k), fwd

    async def next_candidates(
        self, state: _Session, tokens: Sequence[int], params: SamplingParams, seed: int, k: int
    ) -> tuple[list[int], Forward]:
        """The forward pass and the guesses in one trip to the worker thread;
        only the ``k`` ids leave the device."""
        return await self.core.run_in_executor(self._candidates_sync, state, list(tokens), params, seed, k)

    async def next_candidates_batch(self, items: list[DraftItem]) -> list[tuple[list[int], Forward]]:
        """The next-token steps of several streams in one forward pass."""
        fwds = await self.core.forward_batch([BatchItem(i.state, list(i.tokens), 1) for i in items])
        return [
            (sampling.top_candidates(f.rows[0], i.params, i.seed, len(i.tokens), i.k), f)
            for i, f in zip(items, fwds, strict=True)
        ]
