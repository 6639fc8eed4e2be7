"""An OpenAI-compatible HTTP API on the coordinator (``--http-port``).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (with and without
``"stream": true``, server-sent events ending with ``data: [DONE]``),
``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``. A thin
translation like the gRPC servicer: JSON in, :meth:`Coordinator.generate`,
JSON out; dsi's domain errors become HTTP statuses in :data:`ERRORS`, with
OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``.

Beyond the OpenAI fields, a request may set ``strategy`` (``"nonsi"``,
``"si"`` or ``"dsi"``), ``lookahead`` (a number, or ``"auto"``), ``tree``
(e.g. ``"3x2"``) and ``top_k``; unset ones take the coordinator's defaults.
docs/api.md describes every field and what is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dsi.domain import errors
from dsi.domain.errors import InvalidArgument
from dsi.domain.types import TreeShape
from dsi.serving.web import HttpServer, start_http
from dsi.wire.security import ServerSecurity
from services.coordinator.coordinator import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    Coordinator,
    GenerateInput,
    GenerateOutput,
)
from services.coordinator.engine import FinishReason, GenerationStats, Strategy

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: a long prompt as JSON token ids fits easily
SEED_LIMIT = 1 << 64

#: dsi domain error -> (HTTP status, OpenAI error type, code)
ERRORS: list[tuple[type[errors.DsiError], int, str, str | None]] = [
    (errors.InvalidArgument, 400, "invalid_request_error", None),
    (errors.NotFound, 404, "not_found_error", None),
    (errors.ResourceExhausted, 429, "rate_limit_error", "resource_exhausted"),
    (errors.Unauthenticated, 401, "authentication_error", "invalid_api_key"),
    (errors.Unavailable, 503, "service_unavailable_error", "unavailable"),
    (errors.DeadlineExceeded, 504, "timeout_error", "deadline_exceeded"),
    (errors.Cancelled, 503, "service_unavailable_error", "cancelled"),
]

#: dsi finish reason -> OpenAI finish_reason ("eos" is a natural stop, as for OpenAI)
FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.CANCELLED: "cancelled",
}


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> ApiError:
    """The ApiError for any exception (dsi domain errors by :data:`ERRORS`)."""
    if isinstance(exc, ApiError):
        return exc
    for cls, status, type_, code in ERRORS:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), type_, code=code)
    log.exception("unexpected error in the OpenAI API", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", code="internal")


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


# --- request fields --------------------------------------------------------------------


def shown(v: Any, limit: int = 80) -> str:
    """A field's value for an error message: JSON, cut to ``limit`` characters
    (a value can be megabytes long, or nested too deeply to print)."""
    try:
        text = json.dumps(v)
    except (RecursionError, ValueError):
        text = f"<a {type(v).__name__} nested too deeply to show>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Fields:
    """Typed access to a JSON request body; a wrong type is a 400 naming the field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_int(v):
            raise invalid(name, f"'{name}' must be an integer, got {shown(v)}")
        if minimum is not None and v < minimum:
            raise invalid(name, f"'{name}' must be >= {minimum}, got {v}")
        return v

    def number(self, name: str, default: float) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_number(v):
            raise invalid(name, f"'{name}' must be a finite number, got {shown(v)}")
        return float(v)

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise invalid(name, f"'{name}' must be true or false, got {shown(v)}")
        return v

    def unsupported(self, name: str, *allowed: Any) -> None:
        """Refuse a field that is set to anything but ``allowed`` (or null)."""
        v = self.body.get(name)
        if v is not None and v not in allowed:
            raise invalid(name, f"'{name}' is not supported by dsi (got {shown(v)})")


@dataclass
class Request:
    """What both endpoints share, validated."""

    model: str
    input: GenerateInput
    stream: bool
    include_usage: bool


@dataclass
class Settings:
    """Server-side settings of the HTTP API."""

    model_name: str
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


def parse_common(f: Fields, settings: Settings, prompt_ids: list[int], max_tokens_fields: tuple[str, ...]) -> Request:
    model = f.body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "'model' must be a string")
    if model and model != settings.model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{settings.model_name}' (see /v1/models)",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )
    if f.integer("n", 1) != 1:
        raise invalid("n", "dsi generates one choice per request: 'n' must be 1")
    for name in ("presence_penalty", "frequency_penalty"):
        f.unsupported(name, 0, 0.0)  # they would change the target's distribution
    f.unsupported("logit_bias", {})
    f.unsupported("logprobs", False)
    f.unsupported("top_logprobs", 0)
    max_new = 0
    for name in max_tokens_fields:  # chat: max_completion_tokens, else the older max_tokens
        if f.body.get(name) is not None:
            max_new = f.integer(name, 0, minimum=1)
            break
    temperature = f.number("temperature", 1.0)  # OpenAI's default: sampling at temperature 1
    top_p = f.number("top_p", 1.0)
    top_k = f.integer("top_k", 0, minimum=-1)  # -1 (as in vLLM) or 0: off
    seed = f.body.get("seed")  # None: the coordinator draws one and reports it in dsi.stats.seed
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise invalid("seed", f"'seed' must be an integer in [0, 2**64), got {shown(seed)}")
    strategy = f.body.get("strategy")
    if strategy is not None:
        names = [s.value for s in Strategy]
        if strategy not in names:
            raise invalid("strategy", f"'strategy' must be one of {', '.join(names)}, got {shown(strategy)}")
        strategy = Strategy(strategy)
    auto_lookahead = f.body.get("lookahead") == "auto"
    if isinstance(f.body.get("lookahead"), str) and not auto_lookahead:
        raise invalid("lookahead", f"'lookahead' must be an integer or \"auto\", got {shown(f.body['lookahead'])}")
    lookahead = 0 if auto_lookahead else f.integer("lookahead", 0, minimum=0)
    tree = f.body.get("tree")
    if tree is not None:
        if not isinstance(tree, str):
            raise invalid("tree", f'\'tree\' must be a string such as "3x2" or "chain", got {json.dumps(tree)}')
        try:
            tree = TreeShape.parse(tree)
        except InvalidArgument as exc:
            raise invalid("tree", str(exc)) from None
    stop = f.body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop", "'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise invalid("stop", f"a stop string has at most {MAX_STOP_LENGTH} characters")
    stream = f.boolean("stream")
    options = f.body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    include_usage = bool(options and Fields(options).boolean("include_usage"))
    return Request(
        model=settings.model_name,
        input=GenerateInput(
            prompt_token_ids=prompt_ids,
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=max(top_k, 0),
            seed=seed,
            strategy=strategy,
            lookahead=lookahead,
            auto_lookahead=auto_lookahead,
            stop=stop,
            tree=tree,
        ),
        stream=stream,
        include_usage=include_usage,
    )


def completion_prompt(coordinator: Coordinator, prompt: Any) -> list[int]:
    """A completions prompt: a string (needs a tokenizer), a list of token
    ids, or a list holding exactly one of those."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not coordinator.codec.has_tokenizer:
            raise invalid(
                "prompt",
                "this server has no tokenizer (synthetic models, or no --tokenizer): send 'prompt' as a list of"
                " token ids, e.g. [1, 2, 3]",
            )
        return coordinator.codec.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt", "dsi generates one completion per request: send one prompt, not a batch")
    raise invalid("prompt", "'prompt' must be a non-empty string or a non-empty list of token ids")


def message_text(m: Any, i: int) -> tuple[str, str]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise invalid("messages", f"messages[{i}] must be an object with a string 'role'")
    content = m.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid("messages", f"messages[{i}]: only text content parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")
    return m["role"], content


def fallback_chat_text(messages: list[tuple[str, str]]) -> str:
    """The prompt of a tokenizer without a chat template: one ``role: content``
    line per message, then ``assistant:`` for the reply."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def chat_prompt(coordinator: Coordinator, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list")
    parsed = [message_text(m, i) for i, m in enumerate(messages)]
    tok = coordinator.codec.tokenizer
    if tok is None:
        raise invalid(
            "messages",
            "chat needs a tokenizer and this server has none (synthetic models, or no --tokenizer):"
            " use /v1/completions with 'prompt' as a list of token ids",
        )
    if getattr(tok, "chat_template", None):
        try:
            ids = tok.apply_chat_template(
                [{"role": r, "content": c} for r, c in parsed],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        except Exception as exc:  # a template may refuse a conversation (e.g. roles that do not alternate)
            raise invalid("messages", f"the chat template refused the messages: {exc}") from None
        return [int(t) for t in ids]
    return coordinator.codec.encode(fallback_chat_text(parsed))


# --- responses -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def dsi_extra(req: Request, coordinator: Coordinator, out: GenerateOutput) -> dict[str, Any]:
    """The ``dsi`` object of a final response: native finish reason and stats."""
    stats: GenerationStats | None = out.stats
    return {
        "strategy": (req.input.strategy or coordinator.defaults.strategy).value,
        "finish_reason": out.finish_reason.value if out.finish_reason else None,
        "stats": stats.as_dict() if stats is not None else None,
    }


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


async def _first(stream: AsyncIterator[GenerateOutput]) -> GenerateOutput:
    """The first output. Awaited before any byte of the response is sent, so
    invalid requests get a proper 4xx, not a 200 with an error event."""
    return await stream.__anext__()


class OpenAIApi:
    """The aiohttp application of the OpenAI-compatible endpoint."""

    def __init__(self, coordinator: Coordinator, settings: Settings) -> None:
        self.coordinator = coordinator
        self.settings = settings
        self.created = int(time.time())
        self.closing = False
        self.app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[self._errors])
        r = self.app.router
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.model)
        r.add_get("/health", self.health)

    # --- plumbing ---------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        try:
            return await handler(request)
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's 413
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            message = exc.reason
            if exc.status == 413:
                message = f"the request body exceeds the limit of {self.settings.max_request_bytes} bytes"
            elif exc.status == 404:
                message = f"no such endpoint: {request.method} {request.path}"
            err = ApiError(exc.status, message, "invalid_request_error", code=code)
            return web.json_response(err.body(), status=exc.status)
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            err = api_error(exc)
            return web.json_response(err.body(), status=err.status)

    async def _body(self, request: web.Request) -> Fields:
        limit = self.settings.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(
                413,
                f"the request body exceeds the limit of {limit} bytes",
                "invalid_request_error",
                code="request_too_large",
            )
        raw = await request.read()  # aiohttp enforces client_max_size for chunked bodies too (413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:  # json's parser recurses once per nesting level
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return Fields(body)

    # --- endpoints ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        targets = len(self.coordinator.engine.targets)
        ok = not self.closing and targets > 0
        body = {
            "status": "ok" if ok else "unavailable",
            "targets": targets,
            "drafters": len(self.coordinator.engine.drafters),
        }
        return web.json_response(body, status=200 if ok else 503)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "dsi"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.settings.model_name:
            raise ApiError(404, f"the model '{name}' does not exist", "invalid_request_error", code="model_not_found")
        return web.json_response(self._model_card())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        f = await self._body(request)
        if "prompt" not in f.body:
            raise invalid("prompt", "'prompt' is required")
        for name, allowed in (("echo", False), ("best_of", 1), ("suffix", "")):
            f.unsupported(name, allowed)
        prompt = completion_prompt(self.coordinator, f.body["prompt"])
        req = parse_common(f, self.settings, prompt, ("max_tokens",))
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model}

        def choice(out: GenerateOutput) -> dict[str, Any]:
            return {
                "index": 0,
                "text": out.text,
                "token_ids": out.token_ids,
                "logprobs": None,
                "finish_reason": FINISH[out.finish_reason] if out.finish_reason else None,
            }

        return await self._respond(request, req, head, choice, lambda text, ids: {"text": text, "token_ids": ids})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        f = await self._body(request)
        if "messages" not in f.body:
            raise invalid("messages", "'messages' is required")
        if f.body.get("tools"):
            raise invalid("tools", "'tools' are not supported by dsi")
        fmt = f.body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise invalid("response_format", "only the 'text' response_format is supported")
        prompt = chat_prompt(self.coordinator, f.body["messages"])
        req = parse_common(f, self.settings, prompt, ("max_completion_tokens", "max_tokens"))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model}
        first_delta = True

        def choice(out: GenerateOutput) -> dict[str, Any]:
            nonlocal first_delta
            delta: dict[str, Any] = {"content": out.text} if out.text else {}
            if first_delta:
                delta = {"role": "assistant", "content": out.text}
                first_delta = False
            return {
                "index": 0,
                "delta": delta,
                "token_ids": out.token_ids,
                "logprobs": None,
                "finish_reason": FINISH[out.finish_reason] if out.finish_reason else None,
            }

        def whole(text: str, ids: list[int]) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}, "token_ids": ids}

        return await self._respond(request, req, head, choice, whole, chat=True)

    async def _respond(
        self,
        request: web.Request,
        req: Request,
        head: dict[str, Any],
        chunk_choice: Callable[[GenerateOutput], dict[str, Any]],
        whole_choice: Callable[[str, list[int]], dict[str, Any]],
        chat: bool = False,
    ) -> web.StreamResponse:
        prompt_tokens = len(req.input.prompt_token_ids)
        stream = self.coordinator.generate(req.input)
        try:
            out = await _first(stream)
            if not req.stream:
                text, ids = out.text, list(out.token_ids)
                while out.finish_reason is None:
                    out = await stream.__anext__()
                    text += out.text
                    ids.extend(out.token_ids)
                reply = dict(head, object="chat.completion" if chat else "text_completion")
                choice = whole_choice(text, ids)
                choice.update(index=0, logprobs=None, finish_reason=FINISH[out.finish_reason])
                reply.update(
                    choices=[choice],
                    usage=usage(prompt_tokens, len(ids)),
                    dsi=dsi_extra(req, self.coordinator, out),
                )
                return web.json_response(reply)
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
            await resp.prepare(request)
            completion_tokens = 0
            try:
                while True:
                    completion_tokens += len(out.token_ids)
                    chunk = dict(head, choices=[chunk_choice(out)])
                    if out.finish_reason is not None:
                        chunk["dsi"] = dsi_extra(req, self.coordinator, out)
                    await resp.write(sse(chunk))
                    if out.finish_reason is not None:
                        break
                    out = await stream.__anext__()
                if req.include_usage:
                    await resp.write(sse(dict(head, choices=[], usage=usage(prompt_tokens, completion_tokens))))
            except (asyncio.CancelledError, ConnectionResetError):
                raise
            except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
                await resp.write(sse(api_error(exc).body()))
            await resp.write(sse("[DONE]"))
            await resp.write_eof()
            return resp
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


async def start_openai_api(
    coordinator: Coordinator,
    host: str,
    port: int,
    model_name: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    grace: float = 5.0,
    security: ServerSecurity | None = None,
) -> tuple[OpenAIApi, HttpServer]:
    """Serve the OpenAI-compatible API of ``coordinator`` on ``host:port``.
    The model is named ``model_name``, by default the first target's model id.
    ``security``: TLS and a bearer token (the gRPC port's; default: none)."""
    name = model_name or coordinator.reference.info.model.model_id
    api = OpenAIApi(coordinator, Settings(name, max_request_bytes))
    return api, await start_http(api.app, host, port, grace, security)
