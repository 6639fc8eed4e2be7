"""The coordinator's OpenAI-compatible HTTP API: the official ``openai``
client against a running coordinator (completions, chat, streaming, models),
raw HTTP for the error cases, and cancellation on client disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import openai
import pytest

from dsi.domain import errors
from dsi.wire.client import Client, request
from services.coordinator.coordinator import Codec, Defaults
from services.coordinator.openai_api import OpenAIApi, api_error, fallback_chat_text, start_openai_api
from tests.helpers import LOOPBACK, LocalCluster, eventually, local_cluster, record_params, released, tiny_tokenizer

T = "synthetic:vocab=300,seed=21,tpot_ms=2"
D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.6"
# A synthetic pair whose vocabulary fits the tiny word-level tokenizer, for text prompts and chat.
TT = "synthetic:vocab=64,seed=3,tpot_ms=1"
TD = "synthetic:vocab=64,seed=3,tpot_ms=0,acceptance=0.7"
MODEL = "dsi-test"


@dataclass
class Api:
    cluster: LocalCluster
    api: OpenAIApi
    url: str
    client: openai.AsyncOpenAI


@asynccontextmanager
async def api_cluster(targets=(T, T), drafters=(D,), codec: Codec | None = None, **kw) -> AsyncIterator[Api]:
    async with local_cluster(list(targets), list(drafters), serve_coordinator=True, codec=codec) as c:
        api, server = await start_openai_api(c.coordinator, LOOPBACK, 0, MODEL, grace=0.5, **kw)
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        try:
            yield Api(c, api, server.url, client)
        finally:
            await client.close()
            await server.stop()


async def grpc_reference(address: str, ids: list[int], n: int, strategy: str = "nonsi", **kw):
    async with Client(address) as py:
        return await py.generate(request("", ids, n, strategy, **kw))


# --- the official client ---------------------------------------------------------------


async def test_completions_with_token_ids_equal_the_grpc_result_for_every_strategy():
    async with api_cluster() as a:
        ref = await grpc_reference(a.cluster.coordinator_address, [1, 2, 3], 20)
        for strategy in ("nonsi", "si", "dsi"):
            r = await a.client.completions.create(
                model=MODEL,
                prompt=[1, 2, 3],
                max_tokens=20,
                temperature=0,
                extra_body={"strategy": strategy, "lookahead": 3},
            )
            assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
            choice = r.choices[0]
            assert choice.text == ref.text and choice.finish_reason == "length"
            assert choice.model_extra["token_ids"] == ref.token_ids
            assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 20, 23)
            extra = r.model_extra["dsi"]
            assert extra["strategy"] == strategy and extra["finish_reason"] == "length"
            assert extra["stats"]["new_tokens"] == 20
            if strategy != "nonsi":
                assert extra["stats"]["drafted_tokens"] > 0


async def test_streamed_completion_is_the_same_text_in_sse_chunks_with_usage():
    async with api_cluster() as a:
        ref = await grpc_reference(a.cluster.coordinator_address, [4, 5], 15)
        stream = await a.client.completions.create(
            model=MODEL,
            prompt=[[4, 5]],  # a batch of one prompt is one prompt
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"strategy": "dsi"},
        )
        chunks = [c async for c in stream]
        text_chunks = [c for c in chunks if c.choices]
        assert len(text_chunks) > 1, "nothing was streamed before the end"
        assert "".join(c.choices[0].text for c in text_chunks) == ref.text
        assert [t for c in text_chunks for t in c.choices[0].model_extra["token_ids"]] == ref.token_ids
        assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
        assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


async def test_stop_strings_and_seeded_sampling():
    async with api_cluster() as a:
        full = await a.client.completions.create(model=MODEL, prompt=[7], max_tokens=12, temperature=0)
        words = full.choices[0].text.split()
        cut = await a.client.completions.create(
            model=MODEL, prompt=[7], max_tokens=12, temperature=0, stop=[f" {words[3]}"]
        )
        assert cut.choices[0].text == " ".join(words[:3]) and cut.choices[0].finish_reason == "stop"
        assert cut.model_extra["dsi"]["finish_reason"] == "stop"
        # Sampling (OpenAI's default temperature 1) with a seed is reproducible, under every strategy.
        kw = dict(model=MODEL, prompt=[9, 9], max_tokens=10, seed=2**63 + 5)
        strategies = ("si", "dsi", "nonsi")
        runs = [await a.client.completions.create(**kw, extra_body={"strategy": s, "top_k": 10}) for s in strategies]
        assert len({tuple(r.choices[0].model_extra["token_ids"]) for r in runs}) == 1
        assert runs[0].model_extra["dsi"]["stats"]["seed"] == 2**63 + 5
        # Without a seed: a fresh one each time, reported, and it repeats the completion.
        kw = dict(model=MODEL, prompt=[9, 9], max_tokens=10)
        free = [await a.client.completions.create(**kw) for _ in range(2)]
        seeds = [r.model_extra["dsi"]["stats"]["seed"] for r in free]
        assert seeds[0] != seeds[1] and free[0].choices[0].text != free[1].choices[0].text
        again = await a.client.completions.create(**kw, seed=seeds[0])
        assert again.choices[0].text == free[0].choices[0].text


async def test_models_list_and_retrieve():
    async with api_cluster() as a:
        models = await a.client.models.list()
        assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "dsi"
        assert (await a.client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await a.client.models.retrieve("gpt-4")


async def test_chat_with_the_fallback_prompt_and_with_a_chat_template():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "the cat"},
        {"role": "user", "content": [{"type": "text", "text": "sat on"}, {"type": "text", "text": " the mat"}]},
    ]
    async with api_cluster((TT, TT), (TD,), codec=Codec(tok)) as a:
        prompt = tok.encode(fallback_chat_text([("system", "the cat"), ("user", "sat on the mat")]))
        ref = await grpc_reference(a.cluster.coordinator_address, prompt, 10)
        r = await a.client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, extra_body={"strategy": "dsi"}
        )
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 10

        stream = await a.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == "length"

        # A tokenizer with a chat template: apply_chat_template builds the prompt.
        tok.chat_template = (
            "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}big{% endif %}"
        )
        templated = tok.apply_chat_template(
            [{"role": "user", "content": "the dog"}], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        ref = await grpc_reference(a.cluster.coordinator_address, templated, 8)
        r = await a.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "the dog"}], max_tokens=8, temperature=0
        )
        assert r.usage.prompt_tokens == len(templated) and r.choices[0].message.content == ref.text

        # With a tokenizer, completions take text prompts too.
        text = await a.client.completions.create(model=MODEL, prompt="the cat sat", max_tokens=5, temperature=0)
        ref = await grpc_reference(a.cluster.coordinator_address, tok.encode("the cat sat"), 5)
        assert text.choices[0].text == ref.text and text.usage.prompt_tokens == len(tok.encode("the cat sat"))


async def test_without_a_tokenizer_chat_and_text_prompts_are_refused_clearly():
    async with api_cluster((T,), (D,)) as a:
        with pytest.raises(openai.BadRequestError) as err:
            await a.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert "tokenizer" in err.value.message and "token ids" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            await a.client.completions.create(model=MODEL, prompt="hello")
        assert "list of token ids" in err.value.message


# --- raw HTTP: errors --------------------------------------------------------------------


async def post(session: aiohttp.ClientSession, url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"prompt": [1, 2', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"model": "gpt-4", "prompt": [1]}, 404, "does not exist"),
        ({"prompt": [1], "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
        ({"prompt": [1], "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
        ({"prompt": [1], "temperature": -1}, 400, "temperature"),
        ({"prompt": [1], "top_p": 1.5}, 400, "top_p"),
        ({"prompt": [1], "strategy": "fast"}, 400, "'strategy' must be one of"),
        ({"prompt": [1], "lookahead": 1000}, 400, "lookahead"),
        ({"prompt": [1], "lookahead": "fast"}, 400, "'lookahead' must be an integer or \"auto\""),
        ({"prompt": [1], "n": 2}, 400, "'n' must be 1"),
        ({"prompt": [1], "seed": -1}, 400, "'seed'"),
        ({"prompt": [1], "stream": "yes"}, 400, "'stream' must be true or false"),
        ({"prompt": [1], "presence_penalty": 0.5}, 400, "not supported"),
        ({"prompt": [1], "echo": True}, 400, "not supported"),
        ({"prompt": [1], "stop": [1]}, 400, "'stop'"),
        ({"prompt": [[1], [2]]}, 400, "one prompt"),
        ({"prompt": []}, 400, "'prompt' must be"),
        ({}, 400, "'prompt' is required"),
        ({"prompt": [1, 300]}, 400, "outside the vocabulary"),
        ({"prompt": [1], "max_tokens": 100_000}, 400, "context limit"),
    ],
)
async def test_bad_completion_requests_get_openai_style_4xx(body, status, needle):
    async with api_cluster((T,), (D,)) as a, aiohttp.ClientSession() as s:
        code, reply = await post(s, f"{a.url}/v1/completions", body)
        assert code == status, reply
        err = reply["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error"
        assert set(err) == {"message", "type", "param", "code"}


async def test_lookahead_auto_chooses_it_as_the_generation_runs(monkeypatch):
    """``"lookahead": "auto"``: the automatic lookahead, though the server's
    default is a fixed one; the same tokens as gRPC."""
    seen = record_params(monkeypatch)
    async with api_cluster() as a:
        a.cluster.coordinator.defaults = Defaults(lookahead=5)
        ref = await grpc_reference(a.cluster.coordinator_address, [1, 2, 3], 20)
        r = await a.client.completions.create(
            model=MODEL, prompt=[1, 2, 3], max_tokens=20, temperature=0, extra_body={"lookahead": "auto"}
        )
        assert r.choices[0].model_extra["token_ids"] == ref.token_ids
        assert seen[-1].lookahead == 0 and seen[0].lookahead == 5  # the gRPC reference: the server's default


async def test_oversized_unknown_and_wrong_method_requests():
    async with api_cluster((T,), (D,), max_request_bytes=4096) as a, aiohttp.ClientSession() as s:
        big = {"prompt": [1] * 5000}
        code, reply = await post(s, f"{a.url}/v1/completions", big)
        assert code == 413 and "4096 bytes" in reply["error"]["message"]
        assert reply["error"]["code"] == "request_too_large"
        # Without a Content-Length (chunked), aiohttp's own limit answers, in the same shape.
        async with s.post(f"{a.url}/v1/chat/completions", data=_chunks(json.dumps(big).encode())) as resp:
            assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"
        async with s.get(f"{a.url}/v1/nothing") as resp:
            assert resp.status == 404 and "no such endpoint" in (await resp.json())["error"]["message"]
        async with s.get(f"{a.url}/v1/completions") as resp:
            assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
        code, reply = await post(s, f"{a.url}/v1/chat/completions", {"messages": [{"content": "x"}]})
        assert code == 400 and "role" in reply["error"]["message"]
        async with s.get(f"{a.url}/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        a.api.closing = True
        async with s.get(f"{a.url}/health") as resp:
            assert resp.status == 503


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1024):
        yield data[i : i + 1024]


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (errors.InvalidArgument("x"), 400, "invalid_request_error"),
        (errors.NotFound("x"), 404, "not_found_error"),
        (errors.ResourceExhausted("x"), 429, "rate_limit_error"),
        (errors.Unavailable("x"), 503, "service_unavailable_error"),
        (errors.Internal("x"), 500, "server_error"),
    ],
)
def test_domain_errors_map_to_http_statuses(exc, status, type_):
    e = api_error(exc)
    assert (e.status, e.type) == (status, type_) and e.body()["error"]["message"].endswith("x")


async def test_an_unreachable_target_gives_503_naming_it():
    async with api_cluster((T,), (D,)) as a, aiohttp.ClientSession() as s:
        dead = a.cluster.servers[0]
        await dead.stop(grace=0)
        code, reply = await post(s, f"{a.url}/v1/completions", {"prompt": [1], "max_tokens": 5, "temperature": 0})
        assert code == 503 and dead.address in reply["error"]["message"]
        # Streaming: the error comes before any event, as a plain 503.
        body = {"prompt": [1], "max_tokens": 5, "stream": True}
        code, reply = await post(s, f"{a.url}/v1/completions", body)
        assert code == 503


# --- cancellation ------------------------------------------------------------------------


def held(c: LocalCluster) -> str:
    """What is still held, for a failure's message."""
    targets = [(len(t.sessions), t.sessions.busy) for t in c.local_targets]
    drafters = [(len(d.sessions), d.active_streams) for d in c.local_drafters]
    leases = [len(s.leases) for s in c.coordinator.engine.targets.slots]
    return f"targets (sessions, busy) {targets}, drafters (sessions, streams) {drafters}, leases {leases}"


async def assert_everything_stops(c: LocalCluster) -> None:
    try:
        await eventually(lambda: released(c), timeout=3.0)
    except AssertionError:
        raise AssertionError(f"not released within 3 s: {held(c)}") from None
    drafted = sum(d.counters.drafted_tokens for d in c.local_drafters)
    passes = sum(t.counters.forward_passes for t in c.local_targets)
    await asyncio.sleep(0.1)  # many target forward periods: nothing may still be running
    assert sum(d.counters.drafted_tokens for d in c.local_drafters) == drafted
    assert sum(t.counters.forward_passes for t in c.local_targets) == passes


SLOW_T = "synthetic:vocab=300,seed=6,tpot_ms=10"
SLOW_D = "synthetic:vocab=300,seed=6,tpot_ms=1,acceptance=0.7"


async def test_a_client_that_disconnects_from_a_stream_cancels_the_generation():
    async with api_cluster((SLOW_T,) * 3, (SLOW_D,)) as a, aiohttp.ClientSession() as s:
        body = {"prompt": [1, 2], "max_tokens": 1000, "stream": True, "temperature": 0, "strategy": "dsi"}
        resp = await s.post(f"{a.url}/v1/completions", json=body)
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = 0
        async for line in resp.content:
            if line.startswith(b"data: "):
                events += 1
                if events >= 5:
                    break
        assert any(len(t.sessions) for t in a.cluster.local_targets), "the generation held no target session"
        resp.close()  # drop the connection mid-stream
        await assert_everything_stops(a.cluster)


async def test_a_client_that_gives_up_on_a_whole_completion_cancels_it():
    async with api_cluster((SLOW_T,) * 2, (SLOW_D,)) as a, aiohttp.ClientSession() as s:
        body = {"prompt": [1, 2], "max_tokens": 1000, "temperature": 0, "strategy": "si"}
        with pytest.raises(asyncio.TimeoutError):
            await s.post(f"{a.url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.3))
        await assert_everything_stops(a.cluster)
