"""The public API (dsi.v1.GenerationService) over real gRPC, end to end:
targets and drafter served on loopback, the coordinator talking to them
through the gRPC transport, clients using the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from dsi.domain.errors import InvalidArgument
from dsi.domain.types import TreeShape
from dsi.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Codec, Coordinator, Defaults, GenerateInput, TextStream
from services.coordinator.engine import Strategy
from tests.helpers import LOOPBACK, eventually, local_cluster, record_params, released, serve

T = "synthetic:vocab=300,seed=21,tpot_ms=4"
D = "synthetic:vocab=300,seed=21,tpot_ms=1,acceptance=0.6"
STRATEGY_PB = {
    "nonsi": generation_pb2.STRATEGY_NONSI,
    "si": generation_pb2.STRATEGY_SI,
    "dsi": generation_pb2.STRATEGY_DSI,
}


def stub(address: str) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(grpc.aio.insecure_channel(address))


async def collect(stub_, **fields) -> tuple[list[int], str, list[generation_pb2.GenerateResponse]]:
    msgs = [m async for m in stub_.Generate(generation_pb2.GenerateRequest(**fields))]
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs


async def test_generate_streams_the_same_tokens_for_every_strategy():
    async with local_cluster([T, T, T], [D], serve_coordinator=True) as c:
        s = stub(c.coordinator_address)
        outs = {}
        for name, strategy in STRATEGY_PB.items():
            ids, text, msgs = await collect(s, prompt_token_ids=[1, 2, 3], max_new_tokens=30, strategy=strategy)
            outs[name] = ids
            assert len(ids) == 30
            assert text == " ".join(map(str, ids))  # synthetic models: ids joined by spaces
            assert len(msgs) > 1, "nothing was streamed before the end"
            last = msgs[-1]
            assert last.finish_reason == generation_pb2.FINISH_REASON_LENGTH
            assert all(m.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
            st = last.stats
            assert st.new_tokens == 30 and st.wall_seconds > 0 and 0 < st.time_to_first_token_seconds <= st.wall_seconds
            assert st.target_forward_passes >= 1 and st.verifications_started >= st.target_forward_passes
            if name != "nonsi":
                assert st.drafted_tokens > 0 and st.draft_streams > 0 and 0 < st.acceptance_rate <= 1
        assert outs["nonsi"] == outs["si"] == outs["dsi"]


async def test_get_info_reports_replicas_and_defaults():
    defaults = Defaults(Strategy.SI, lookahead=7, max_new_tokens=33, max_sp_degree=2)
    async with local_cluster([T, T, T], [D], serve_coordinator=True, defaults=defaults) as c:
        info = await stub(c.coordinator_address).GetInfo(generation_pb2.GetInfoRequest())
        assert [r.address for r in info.targets] == [srv.address for srv in c.servers[:3]]
        assert len(info.drafters) == 1 and info.drafters[0].model.backend == "synthetic"
        assert info.targets[0].model.vocab_size == 300
        assert info.defaults.strategy == generation_pb2.STRATEGY_SI
        assert (info.defaults.lookahead, info.defaults.max_new_tokens, info.defaults.max_sp_degree) == (7, 33, 2)
        assert not info.has_tokenizer
        # The defaults apply when a request leaves fields at 0.
        ids, _, msgs = await collect(stub(c.coordinator_address), prompt_token_ids=[4])
        assert len(ids) == 33 and msgs[-1].stats.draft_streams > 0


async def test_unseeded_requests_draw_a_fresh_seed_that_repeats_them():
    """Issue 12: without a seed, sampled requests differ; the seed each one
    reports repeats it exactly, under every strategy."""
    async with local_cluster([T, T], [D], serve_coordinator=True) as c:
        s = stub(c.coordinator_address)
        sampled = dict(prompt_token_ids=[1, 2, 3], max_new_tokens=24, temperature=1.0, lookahead=3)
        runs = [await collect(s, **sampled, strategy=STRATEGY_PB["dsi"]) for _ in range(3)]
        seeds = [msgs[-1].stats.seed for _, _, msgs in runs]
        assert len(set(seeds)) == 3 and all(0 <= x < 2**53 for x in seeds), seeds
        assert len({tuple(ids) for ids, _, _ in runs}) == 3, "unseeded sampled requests returned the same text"
        first_ids = runs[0][0]
        for strategy in STRATEGY_PB.values():
            ids, _, msgs = await collect(s, **sampled, strategy=strategy, seed=seeds[0])
            assert ids == first_ids, f"seed {seeds[0]} did not repeat the generation under strategy {strategy}"
            assert msgs[-1].stats.seed == seeds[0]
        # An explicit seed 0 is a seed like any other (not "unset").
        zero = [await collect(s, **sampled, strategy=STRATEGY_PB["dsi"], seed=0) for _ in range(2)]
        assert zero[0][0] == zero[1][0] and zero[0][2][-1].stats.seed == 0


async def test_unset_max_new_tokens_stops_at_the_context_limit():
    """Issue 12: a long prompt with max_new_tokens unset generates up to the
    context limit and ends with FINISH_REASON_LENGTH (the default of 128 is
    cut to the room left); an explicit value that does not fit is refused."""
    small = "synthetic:vocab=300,seed=21,max_context=64"
    async with local_cluster([small], [small + ",acceptance=0.6"], serve_coordinator=True) as c:
        s = stub(c.coordinator_address)
        prompt = list(range(1, 55))  # 54 tokens: room for 10
        for strategy in STRATEGY_PB.values():
            ids, _, msgs = await collect(s, prompt_token_ids=prompt, strategy=strategy)
            assert len(ids) == 10 and msgs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH, strategy
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(s, prompt_token_ids=prompt, max_new_tokens=11)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context limit" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(s, prompt_token_ids=list(range(1, 65)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "leaves no room" in err.value.details()
    defaults = Defaults(max_new_tokens=0)  # 0: up to the context limit
    async with local_cluster([small], [], serve_coordinator=True, defaults=defaults) as c:
        ids, _, msgs = await collect(stub(c.coordinator_address), prompt_token_ids=[1, 2], strategy=1)
        assert len(ids) == 62 and msgs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (dict(), "prompt is empty"),
        (dict(prompt_token_ids=[1, 300]), "outside the vocabulary"),
        (dict(prompt_token_ids=[1], max_new_tokens=100_000), "context limit"),
        (dict(prompt_token_ids=[1], strategy=7), "unknown strategy"),
        (dict(prompt_token_ids=[1], lookahead=1000), "lookahead"),
        (dict(prompt_token_ids=[1], lookahead=3, auto_lookahead=True), "auto_lookahead"),
        (dict(prompt_token_ids=[1], temperature=-1.0), "temperature"),
        (dict(prompt_token_ids=[1], top_p=1.5), "top_p"),
        (dict(prompt="hello"), "no tokenizer"),
    ],
)
async def test_invalid_requests_get_invalid_argument(fields, needle):
    async with local_cluster([T], [D], serve_coordinator=True) as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub(c.coordinator_address), **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()


async def test_stale_verifications_and_draft_streams_are_cancelled_on_the_servers():
    """Acceptance 0: every chunk is rejected. With a slow target and a fast
    drafter, speculative verifications are running on the targets when the
    frontier step rejects their first draft; they must be cancelled there."""
    t = "synthetic:vocab=300,seed=5,tpot_ms=40"
    d = "synthetic:vocab=300,seed=5,tpot_ms=2,acceptance=0"
    async with local_cluster([t] * 4, [d], serve_coordinator=True) as c:
        _, _, msgs = await collect(
            stub(c.coordinator_address),
            prompt_token_ids=[1, 2],
            max_new_tokens=8,
            strategy=generation_pb2.STRATEGY_DSI,
            lookahead=2,
        )
        stats = msgs[-1].stats
        assert stats.verifications_cancelled > 0
        await eventually(
            lambda: all(len(t.sessions) == 0 for t in c.local_targets) and not c.local_drafters[0].sessions
        )
        on_targets = sum(t.counters.cancelled_requests for t in c.local_targets)
        assert on_targets > 0, "no Verify was cancelled on any target"
        assert on_targets <= stats.verifications_cancelled
        drafter = c.local_drafters[0]
        assert drafter.counters.cancelled_requests > 0, "no Draft stream was cancelled on the drafter"
        assert drafter.active_streams == 0


async def test_client_cancel_releases_every_session_and_stops_every_rpc():
    t = "synthetic:vocab=300,seed=6,tpot_ms=10"
    d = "synthetic:vocab=300,seed=6,tpot_ms=1,acceptance=0.7"
    async with local_cluster([t] * 3, [d], serve_coordinator=True) as c:
        call = stub(c.coordinator_address).Generate(
            generation_pb2.GenerateRequest(prompt_token_ids=[1, 2], max_new_tokens=1000, strategy=3, lookahead=3)
        )
        got = 0
        async for msg in call:
            got += len(msg.token_ids)
            if got >= 10:
                break
        assert any(len(t.sessions) for t in c.local_targets), "the generation held no target session"
        call.cancel()
        await eventually(lambda: released(c), timeout=3.0)
        drafted = c.local_drafters[0].counters.drafted_tokens
        passes = sum(t.counters.forward_passes for t in c.local_targets)
        await asyncio.sleep(0.1)  # ten target forward periods: nothing may still be running
        assert c.local_drafters[0].counters.drafted_tokens == drafted
        assert sum(t.counters.forward_passes for t in c.local_targets) == passes


async def test_concurrent_generations_are_isolated():
    async with local_cluster([T, T], [D], serve_coordinator=True) as c:
        s = stub(c.coordinator_address)
        prompts = [[i, i + 1, i + 2] for i in range(8)]
        refs = [
            (await collect(s, prompt_token_ids=p, max_new_tokens=25, strategy=generation_pb2.STRATEGY_NONSI))[0]
            for p in prompts
        ]
        results = await asyncio.gather(
            *(
                collect(s, prompt_token_ids=p, max_new_tokens=25, strategy=STRATEGY_PB[name])
                for p in prompts
                for name in ("si", "dsi")
            )
        )
        for i, (ids, _, _) in enumerate(results):
            assert ids == refs[i // 2], f"generation {i} was disturbed by the others"


async def test_a_dead_target_replica_costs_no_request_and_changes_no_token():
    async with local_cluster([T, T, T], [D], serve_coordinator=True) as c:
        s = stub(c.coordinator_address)
        ref, _, _ = await collect(s, prompt_token_ids=[1], max_new_tokens=20, strategy=generation_pb2.STRATEGY_NONSI)
        dead = c.servers[1]
        await dead.stop(grace=0)
        failovers = []
        for name in ("dsi", "si", "nonsi", "dsi", "si"):
            ids, _, msgs = await collect(s, prompt_token_ids=[1], max_new_tokens=20, strategy=STRATEGY_PB[name])
            assert ids == ref, name
            failovers.append(msgs[-1].stats.failovers)
        # The first generation that used the dead replica issued its verification again elsewhere; the
        # replica is then down (its health probe fails), so no later request is sent to it.
        assert failovers[0] >= 1 and failovers[1:] == [0, 0, 0, 0]
        assert not c.coordinator.engine.targets.is_active(1)
        # With every replica gone the request fails, naming them.
        for srv in (c.servers[0], c.servers[2]):
            await srv.stop(grace=0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(s, prompt_token_ids=[1], max_new_tokens=20, strategy=generation_pb2.STRATEGY_DSI)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(srv.address in err.value.details() for srv in c.servers[:3]), err.value.details()


async def test_without_its_drafter_speculation_degrades_to_target_only_steps():
    async with local_cluster([T, T], [D], serve_coordinator=True) as c:
        s = stub(c.coordinator_address)
        ref, _, _ = await collect(s, prompt_token_ids=[1], max_new_tokens=20, strategy=generation_pb2.STRATEGY_NONSI)
        drafter_server = c.servers[2]
        await drafter_server.stop(grace=0)
        for name in ("si", "dsi", "si"):
            ids, _, msgs = await collect(s, prompt_token_ids=[1], max_new_tokens=20, strategy=STRATEGY_PB[name])
            assert ids == ref, name
            st = msgs[-1].stats
            assert st.tokens_without_drafter == 20 and st.accepted_tokens == 0, name
        assert not c.coordinator.engine.drafters.is_active(0)


async def test_vocabulary_mismatch_is_refused_naming_both():
    from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
    from services.drafter.service import register as register_drafter
    from services.target.service import register as register_target

    target = LocalTarget(load_target_model("synthetic:vocab=300"))
    drafter = LocalDrafter(load_drafter_model("synthetic:vocab=301"))
    async with serve(register_target(target)) as ts, serve(register_drafter(drafter)) as ds:
        clients = GrpcTarget(ts.address), GrpcDrafter(ds.address)
        with pytest.raises(InvalidArgument) as err:
            await Coordinator.connect([(ts.address, clients[0])], [(ds.address, clients[1])])
        for client in clients:
            await client.close()
    msg = str(err.value)
    assert ts.address in msg and ds.address in msg and "vocab 301" in msg and "vocab 300" in msg


async def test_connect_times_out_with_unavailable_for_a_missing_target():
    from dsi.domain.errors import Unavailable

    target = GrpcTarget(f"{LOOPBACK}:1")
    with pytest.raises(Unavailable, match=f"{LOOPBACK}:1"):
        await Coordinator.connect([(f"{LOOPBACK}:1", target)], [], timeout=0.5)
    await target.close()


# --- text: tokenizer, incremental decoding, stop strings ------------------------------


async def test_text_prompts_with_a_tokenizer(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_models["llama"])
    tok = AutoTokenizer.from_pretrained(path)
    prompt = "the cat sat on the mat"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    import torch

    ids = tok.encode(prompt)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
        0, len(ids) :
    ].tolist()
    async with local_cluster(
        [path, path], [str(tiny_models["llama-drafter"])], serve_coordinator=True, codec=Codec(tok)
    ) as c:
        s = stub(c.coordinator_address)
        info = await s.GetInfo(generation_pb2.GetInfoRequest())
        assert info.has_tokenizer
        out, text, msgs = await collect(s, prompt=prompt, max_new_tokens=12, strategy=generation_pb2.STRATEGY_DSI)
        assert out == ref and msgs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert text == tok.decode(ref, skip_special_tokens=True)
        # A stop string cuts the text right before it and ends with FINISH_REASON_STOP.
        words = text.split()
        assert len(words) >= 4, "test setup: need a longer completion"
        stop = " ".join(words[2:4])
        out2, text2, msgs2 = await collect(
            s, prompt=prompt, max_new_tokens=12, strategy=generation_pb2.STRATEGY_DSI, stop=[stop]
        )
        assert msgs2[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
        assert text2 == text[: text.index(stop)]
        assert stop not in text2
        assert out2 == out[: len(out2)] and len(out2) < len(out)
        assert msgs2[-1].stats.new_tokens == len(out2)


def test_text_stream_holds_back_a_possible_stop_string_prefix():
    pieces = {1: "hel", 2: "lo wo", 3: "rld", 4: "!"}
    ts = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["world"])
    emitted = ""
    for i in (1, 2):
        delta, stopped = ts.push([i])
        assert not stopped
        emitted += delta
    assert emitted == "hell"  # the last 4 characters ("o wo") could begin "world": held back
    delta, stopped = ts.push([3])
    assert stopped and emitted + delta == "hello "


def test_text_stream_decodes_a_window_and_gives_the_whole_decoding():
    """With a byte-level BPE tokenizer (multi-byte characters split across
    tokens): the pieces add up to decoding every token at once, and each push
    decodes a short window, not the whole output."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "def f(x):\n    return x * 2  # ünïcödé ✓ 漢字 🙂\n"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    ids = tok.encode(text * 10).ids
    windows: list[int] = []

    def decode(window):
        windows.append(len(window))
        return tok.decode(window)

    ts = TextStream(decode, [])
    out = "".join(ts.push([t])[0] for t in ids) + ts.flush()
    assert out == tok.decode(ids) == text * 10
    assert max(windows) <= 8 < len(ids)


def test_text_stream_holds_back_incomplete_utf8():
    chunks = {1: "caf", 2: "\ufffd", 3: "é!"}

    def decode(ids):
        # Like a byte-level tokenizer: an unfinished multi-byte char decodes as U+FFFD.
        text = "".join(chunks[i] for i in ids)
        return text.replace("\ufffdé", "é")

    ts = TextStream(decode, [])
    assert ts.push([1]) == ("caf", False)
    assert ts.push([2]) == ("", False)  # held back until the character is complete
    assert ts.push([3]) == ("é!", False)
    assert ts.flush() == ""


async def test_token_trees_over_grpc_give_the_same_tokens():
    """A tree shape per request (and as the server default): the same greedy
    tokens as chains, alternatives reported in the stats; a shape out of
    range is INVALID_ARGUMENT."""
    d_tree = "synthetic:vocab=300,seed=21,tpot_ms=0.3,acceptance=0.5,sibling_acceptance=0.7"
    defaults = Defaults(tree=TreeShape(2, 2))
    async with local_cluster([T, T], [d_tree], serve_coordinator=True, defaults=defaults) as c:
        s = stub(c.coordinator_address)
        info = await s.GetInfo(generation_pb2.GetInfoRequest())
        assert (info.defaults.tree.width, info.defaults.tree.depth) == (2, 2)
        chain_tree = common_pb2.TreeShape(width=1)
        outs = {}
        for name, strategy in STRATEGY_PB.items():
            for label, tree in (
                ("chain", chain_tree),
                ("3x2", common_pb2.TreeShape(width=3, depth=2)),
                ("default", None),
            ):
                fields = dict(prompt_token_ids=[1, 2, 3], max_new_tokens=30, strategy=strategy, lookahead=3)
                if tree is not None:
                    fields["tree"] = tree
                ids, _, msgs = await collect(s, **fields)
                outs[(name, label)] = ids
                hits = msgs[-1].stats.alternative_hits
                if name == "nonsi" or label == "chain":
                    assert hits == 0
        assert len({tuple(v) for v in outs.values()}) == 1
        hits = 0
        for k in range(1, 6):
            _, _, msgs = await collect(s, prompt_token_ids=[k, 2, 3], max_new_tokens=30, strategy=STRATEGY_PB["si"])
            hits += msgs[-1].stats.alternative_hits
        assert hits > 0, "with sibling acceptance 0.7 some alternative must be taken"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(s, prompt_token_ids=[1], tree=common_pb2.TreeShape(width=40))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tree width" in err.value.details()


async def test_a_request_asks_for_the_automatic_lookahead_whatever_the_server_default(monkeypatch):
    """``auto_lookahead``: the lookahead chosen as the generation runs, though
    the server's default is a fixed 5 (a request's lookahead 0 is that
    default); over gRPC, from the Python client (``lookahead=AUTO``) and the
    OpenAI API (``"lookahead": "auto"``), with the same tokens."""
    from dsi.wire.client import AUTO, Client, request

    seen = record_params(monkeypatch)
    async with local_cluster([T, T], [D], serve_coordinator=True, defaults=Defaults(lookahead=5)) as c:
        s = stub(c.coordinator_address)
        auto, _, _ = await collect(s, prompt_token_ids=[1, 2, 3], max_new_tokens=20, auto_lookahead=True)
        fixed, _, _ = await collect(s, prompt_token_ids=[1, 2, 3], max_new_tokens=20)
        async with Client(c.coordinator_address) as client:
            r = await client.generate(request(prompt_ids=[1, 2, 3], max_new_tokens=20, strategy="si", lookahead=AUTO))
        assert [p.lookahead for p in seen] == [0, 5, 0] and auto == fixed == r.token_ids
        assert request(prompt_ids=[1], lookahead=AUTO).auto_lookahead


async def test_a_consumer_cancelled_again_while_the_generation_cleans_up_still_releases_every_session():
    """A consumer that holds the stream at a yielded output (a slow writer) and
    is cancelled runs the generation's cleanup in its own task, which then waits
    for the cancelled passes to end; a second cancellation of that task (a
    server stopping, a framework cancelling again) must not lose the releases."""
    t = "synthetic:vocab=300,seed=6,tpot_ms=150"
    d = "synthetic:vocab=300,seed=6,tpot_ms=1,acceptance=0.9"
    async with local_cluster([t] * 3, [d]) as c:
        first = asyncio.Event()

        async def slow_writer() -> None:
            req = GenerateInput(prompt_token_ids=[1, 2], max_new_tokens=1000, strategy=Strategy.DSI, lookahead=3)
            stream = c.coordinator.generate(req)
            try:
                async for _ in stream:
                    if any(t.sessions.busy for t in c.local_targets):  # hold it while a pass runs
                        first.set()
                        await asyncio.sleep(60)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        task = asyncio.create_task(slow_writer())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        await asyncio.sleep(0)  # the task is in the cleanup now (cancelled calls end, releases go out)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await eventually(lambda: released(c), timeout=3.0)
