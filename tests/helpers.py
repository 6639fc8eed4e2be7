"""Shared test helpers: tiny Hugging Face models, in-process servers on
loopback ports, and local clusters of targets/drafters/coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dsi.backends import LocalDrafter, LocalTarget, NgramDrafter, load_drafter, load_drafter_model, load_target_model
from dsi.domain.interfaces import Drafter, Target
from dsi.serving.server import RunningServer, start_server
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Codec, Coordinator, Defaults
from services.coordinator.engine import Engine
from services.coordinator.service import register as register_coordinator
from services.drafter.service import DrafterServicer
from services.drafter.service import register as register_drafter
from services.drafter.service import register_servicer as register_drafter_servicer
from services.target.service import TargetServicer, register_servicer
from services.target.service import register as register_target

LOOPBACK = "127.0.0.1"
TINY_VOCAB = 64


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Random tiny causal LMs of two architecture families, saved with
    ``save_pretrained`` and loaded back by path like any real model.

    ``<arch>`` is a target, ``<arch>-drafter`` a smaller model with other random
    weights (a poor drafter: low acceptance is a case worth testing)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    configs = {
        "llama": (
            LlamaForCausalLM,
            LlamaConfig,
            dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
            ),
            0,
        ),
        "llama-drafter": (
            LlamaForCausalLM,
            LlamaConfig,
            dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=256,
            ),
            1,
        ),
        "gpt2": (GPT2LMHeadModel, GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256), 2),
        "gpt2-drafter": (GPT2LMHeadModel, GPT2Config, dict(n_embd=16, n_layer=1, n_head=2, n_positions=256), 3),
    }
    tokenizer = tiny_tokenizer()
    out = {}
    for name, (cls, cfg_cls, kw, seed) in configs.items():
        torch.manual_seed(seed)
        cfg = cfg_cls(vocab_size=TINY_VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
        model = cls(cfg).eval()
        path = root / name
        model.save_pretrained(path)
        if name.startswith("llama"):  # the gpt2 pair has none: the fingerprint falls back to the vocab size
            tokenizer.save_pretrained(path)
        out[name] = path
    return out


TINY_WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "and",
    "ran",
    "to",
    "a",
    "big",
    "red",
    "house",
    "def",
    "return",
    "if",
    "else",
    "for",
    "in",
    "range",
    "print",
    "x",
    "y",
    "n",
    "=",
    "+",
    "-",
    "(",
    ")",
    ":",
    ",",
    "0",
    "1",
    "2",
]


def tiny_tokenizer():
    """A word-level fast tokenizer over a small fixed vocabulary (ids < TINY_VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@asynccontextmanager
async def serve(register) -> AsyncIterator[RunningServer]:
    """A grpc.aio server on an ephemeral loopback port, stopped on exit."""
    running = await start_server(register, LOOPBACK, 0)
    try:
        yield running
    finally:
        await running.stop(grace=0)


@dataclass
class LocalCluster:
    """Targets, drafters and a coordinator built from model specs.

    ``local_targets``/``local_drafters`` are the in-process backends (their
    counters and sessions show what happened on the server side); ``targets``/
    ``drafters`` are what the coordinator talks to (gRPC clients, or the
    backends themselves with ``transport="inproc"``)."""

    local_targets: list[LocalTarget]
    local_drafters: list[LocalDrafter | NgramDrafter]
    targets: list[Target]
    drafters: list[Drafter]
    coordinator: Coordinator
    servers: list[RunningServer] = field(default_factory=list)
    coordinator_address: str = ""


def released(c: LocalCluster) -> bool:
    """Nothing of any generation is held in the cluster: no session on a target or
    drafter, no pass running, no draft stream, no replica leased."""
    return (
        all(len(t.sessions) == 0 and t.sessions.busy == 0 for t in c.local_targets)
        and all(len(d.sessions) == 0 and d.active_streams == 0 for d in c.local_drafters)
        and all(not s.leases for s in c.coordinator.engine.targets.slots)
    )


@asynccontextmanager
async def local_cluster(
    target_specs: Sequence[str],
    drafter_specs: Sequence[str] = (),
    *,
    transport: str = "grpc",
    defaults: Defaults | None = None,
    serve_coordinator: bool = False,
    codec: Codec | None = None,
    max_sessions: int = 256,
) -> AsyncIterator[LocalCluster]:
    async with AsyncExitStack() as stack:
        local_t = [LocalTarget(load_target_model(s), max_sessions=max_sessions) for s in target_specs]
        local_d = [load_drafter(s, max_sessions=max_sessions) for s in drafter_specs]
        servers: list[RunningServer] = []
        if transport == "grpc":
            t_clients: list[Target] = []
            for lt in local_t:
                srv = await stack.enter_async_context(serve(register_target(lt)))
                servers.append(srv)
                t_clients.append(GrpcTarget(srv.address))
            d_clients: list[Drafter] = []
            for ld in local_d:
                srv = await stack.enter_async_context(serve(register_drafter(ld)))
                servers.append(srv)
                d_clients.append(GrpcDrafter(srv.address))
        elif transport == "inproc":
            t_clients, d_clients = list(local_t), list(local_d)
        else:
            raise ValueError(transport)
        coordinator = await Coordinator.connect(
            [(getattr(c, "address", c.name), c) for c in t_clients],
            [(getattr(c, "address", c.name), c) for c in d_clients],
            codec,
            defaults,
            timeout=10.0,
        )
        stack.push_async_callback(coordinator.close)
        cluster = LocalCluster(local_t, local_d, t_clients, d_clients, coordinator, servers)
        if serve_coordinator:
            srv = await stack.enter_async_context(serve(register_coordinator(coordinator)))
            servers.append(srv)
            cluster.coordinator_address = srv.address
        yield cluster


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Wait (bounded) until ``predicate()`` is true; fail the test otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(interval)


def make_engine(target_spec: str, drafter_spec: str, replicas: int, **kw) -> Engine:
    """An in-process engine: ``replicas`` targets of one model and one drafter."""
    targets = [LocalTarget(load_target_model(target_spec)) for _ in range(replicas)]
    drafter = LocalDrafter(load_drafter_model(drafter_spec))
    info = targets[0].model.info
    return Engine(
        targets,
        [drafter],
        eos_token_ids=info.eos_token_ids,
        max_context=info.max_context_tokens,
        vocab_size=info.vocab_size,
        **kw,
    )


@asynccontextmanager
async def serving(register, policy=None) -> AsyncIterator[RunningServer]:
    """A server on loopback for ``register``, stopped after."""
    running = await start_server(register, LOOPBACK, 0, policy)
    try:
        yield running
    finally:
        await running.stop(0)


@asynccontextmanager
async def served_target(
    spec: str, policy=None, **servicer_kw
) -> AsyncIterator[tuple[LocalTarget, TargetServicer, RunningServer]]:
    """A synthetic target served on loopback: (its LocalTarget, servicer, server);
    ``servicer_kw``: TargetServicer's switches (``verify_stream``, ``decode``)."""
    local = LocalTarget(load_target_model(spec))
    servicer = TargetServicer(local, **servicer_kw)
    async with serving(register_servicer(servicer), policy) as running:
        yield local, servicer, running


@asynccontextmanager
async def served_drafter(
    spec: str, policy=None, **servicer_kw
) -> AsyncIterator[tuple[LocalDrafter, DrafterServicer, RunningServer]]:
    """A synthetic drafter served on loopback: (its LocalDrafter, servicer, server);
    ``servicer_kw``: DrafterServicer's switches (``draft_stream``)."""
    local = LocalDrafter(load_drafter_model(spec))
    servicer = DrafterServicer(local, **servicer_kw)
    async with serving(register_drafter_servicer(servicer), policy) as running:
        yield local, servicer, running


@asynccontextmanager
async def informed(client: GrpcTarget | GrpcDrafter):
    """``client`` once it has asked Info, as the coordinator does (context
    prefixes, the streams it may use); closed after."""
    try:
        await client.info()
        yield client
    finally:
        await client.close()


def target_client(address: str, **kw):
    """A GrpcTarget that has asked Info."""
    return informed(GrpcTarget(address, timeout=20, **kw))


def drafter_client(address: str, **kw):
    """A GrpcDrafter that has asked Info."""
    return informed(GrpcDrafter(address, timeout=20, **kw))


async def generate_40(coordinator: Coordinator, strategy) -> list[int]:
    """The ids of a 40-token generation after [5, 6, 7] (seed 1, lookahead 3)."""
    from services.coordinator.coordinator import GenerateInput

    ids: list[int] = []
    request = GenerateInput(prompt_token_ids=[5, 6, 7], max_new_tokens=40, seed=1, strategy=strategy, lookahead=3)
    async for out in coordinator.generate(request):
        ids.extend(out.token_ids)
    return ids


async def target_servers(stack: AsyncExitStack, spec: str, n: int = 2) -> list[tuple[str, GrpcTarget]]:
    """``n`` synthetic targets served on loopback until ``stack`` closes, with
    a client each: what Coordinator.connect takes."""
    clients = []
    for _ in range(n):
        srv = await start_server(register_target(LocalTarget(load_target_model(spec))), LOOPBACK, 0)
        stack.push_async_callback(srv.stop, 0)
        clients.append((srv.address, GrpcTarget(srv.address)))
    return clients


def record_params(monkeypatch) -> list:
    """The parameters (:class:`GenerationParams`) the coordinator runs each
    request with from now on, defaults filled in, in order."""
    seen: list = []
    params = Coordinator.params

    def recording(self, req, prompt):
        p = params(self, req, prompt)
        seen.append(p)
        return p

    monkeypatch.setattr(Coordinator, "params", recording)
    return seen
