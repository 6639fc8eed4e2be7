"""OpenTelemetry tracing of the three services: off by default.

``--otlp-endpoint URL`` on any service, or the standard ``OTEL_*`` environment
variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
or ``OTEL_TRACES_EXPORTER=otlp|console``), turns it on; ``OTEL_SDK_DISABLED=true``
keeps it off. Spans go by OTLP/gRPC (``OTEL_EXPORTER_OTLP_HEADERS``,
``..._INSECURE``, ``..._TIMEOUT``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` apply as
the OpenTelemetry SDK reads them).

What is traced (docs/architecture.md#tracing lists every span and attribute):

* every RPC a server answers (but health and reflection): a SERVER span whose
  parent comes from the W3C ``traceparent`` in the call's metadata, by
  :func:`server_interceptors`;
* every RPC a client makes carries the current span in its metadata
  (:func:`client_interceptors`). The coordinator's Verify and Draft calls
  carry instead the span its engine observer opened for that verification or
  stream (:func:`expect_call`, ``services/coordinator/tracing.py``), so one
  generation is one trace: Generate → generate → Verify (outcome) →
  target's Verify → forward;
* every forward pass of a target or drafter (:func:`instrument_backend`).

With tracing off nothing here is imported by the services beyond this module
(the OpenTelemetry packages load only when it is turned on), no interceptor is
installed and no hook is set: the RPC paths are exactly those of an untraced
build.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from dsi.domain.errors import InvalidArgument
from dsi.wire import transport

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from dsi.backends.base import Forward, LocalDrafter, LocalTarget

log = logging.getLogger(__name__)

#: Instrumentation scope of every dsi span.
SCOPE = "dsi"
#: RPCs never traced: probes and tooling, not work.
UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
VERIFY = "/dsi.v1.TargetService/Verify"
DRAFT = "/dsi.v1.DrafterService/Draft"


def add_tracing_argument(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="send OpenTelemetry traces by OTLP/gRPC to URL, e.g. http://otel-collector:4317 (default: off, unless"
        " the OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_TRACES_EXPORTER environment"
        " variables ask for it)",
    )


def wanted(endpoint: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """Which exporter the flag and the environment ask for: "otlp",
    "console", or None (tracing off)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if endpoint:
        return "otlp"
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter in ("otlp", "console"):
        return exporter
    if exporter and exporter != "none":
        raise InvalidArgument(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported; use otlp, console or none")
    if exporter != "none" and (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return "otlp"
    return None


# --- state ---------------------------------------------------------------------------------


@dataclass
class _Tracing:
    provider: TracerProvider
    tracer: Tracer
    #: Spans waiting for the RPC they describe (see expect_call), by call key.
    expected: dict[Hashable, collections.deque] = field(default_factory=dict)
    #: The span of each generation running, by session id: the parent of its other calls (ReleaseSession).
    sessions: dict[str, Span] = field(default_factory=dict)
    #: The span each recent call claimed, by call key (bounded): a call sent again with the same key
    #: (a Verify or Draft whose context prefix was refused goes out again with the whole context) is its
    #: child too. (Not a context variable: grpc.aio runs client interceptors in a task of their own.)
    claimed: collections.OrderedDict[Hashable, Span] = field(default_factory=collections.OrderedDict)


#: Calls whose claimed span is remembered (:attr:`_Tracing.claimed`).
CLAIMED_KEPT = 1024


_state: _Tracing | None = None


def enabled() -> bool:
    return _state is not None


def tracer() -> Tracer:
    if _state is None:
        raise RuntimeError("tracing is off")
    return _state.tracer


def setup(
    service_name: str,
    endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Turn tracing on for this process if ``endpoint``, ``exporter`` (tests:
    an in-memory one, exported synchronously) or the environment asks for it.
    Returns whether it is on."""
    global _state
    kind = "given" if exporter is not None else wanted(endpoint, env)
    if kind is None:
        return False
    if _state is not None:
        raise RuntimeError("tracing is already set up in this process")
    env = os.environ if env is None else env
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(var, "").strip()
        if kind == "otlp" and protocol and protocol != "grpc":
            raise InvalidArgument(f"{var}={protocol}: dsi exports OTLP over gRPC only (port 4317 of a collector)")
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes: dict[str, Any] = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Without an explicit endpoint the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself.
        otlp = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(otlp))
    _state = _Tracing(provider, provider.get_tracer(SCOPE))
    transport.CHANNEL_INTERCEPTORS.append(client_interceptors)
    log.info("tracing on", extra={"exporter": kind, "endpoint": endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")})
    return True


def shutdown() -> None:
    """Export what is buffered and turn tracing off (at process exit; tests)."""
    global _state
    state, _state = _state, None
    if client_interceptors in transport.CHANNEL_INTERCEPTORS:
        transport.CHANNEL_INTERCEPTORS.remove(client_interceptors)
    if state is not None:
        state.provider.shutdown()


# --- time ----------------------------------------------------------------------------------


class Clock:
    """``time.perf_counter()`` seconds (the engine's clock) to the epoch
    nanoseconds spans take."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def ns(self, perf: float) -> int:
        return self.offset_ns + int(perf * 1e9)


# --- spans awaiting their RPC ----------------------------------------------------------------


def verify_key(session_id: str, base: int, drafts: int) -> tuple:
    return (VERIFY, session_id, base, drafts)


def draft_key(session_id: str, start: int) -> tuple:
    return (DRAFT, session_id, start)


def _context_length(request: Any) -> int:
    """Tokens of a request's context, a prefix the session holds included."""
    return getattr(request, "context_prefix_length", 0) + len(request.context_token_ids)


def _call_key(method: str, request: Any) -> tuple | None:
    if method == VERIFY:
        return verify_key(request.session_id, _context_length(request), len(request.draft_tokens))
    if method == DRAFT:
        return draft_key(request.session_id, _context_length(request))
    return None


def expect_call(key: Hashable, span: Span) -> None:
    """The next client call with ``key`` (:func:`verify_key`,
    :func:`draft_key`) goes out as a child of ``span``, not of the current
    span. Calls are claimed in the order they were expected."""
    if _state is not None:
        _state.expected.setdefault(key, collections.deque()).append(span)


def unexpect_call(key: Hashable, span: Span) -> None:
    """Forget ``span`` if its call never went out (it was cancelled first)."""
    if _state is None:
        return
    queue = _state.expected.get(key)
    if queue is not None:
        try:
            queue.remove(span)
        except ValueError:
            pass
        if not queue:
            del _state.expected[key]


def session_span(session_id: str, span: Span | None) -> None:
    """Calls of session ``session_id`` that no :func:`expect_call` claims go
    out as children of ``span`` (None: forget the session)."""
    if _state is None:
        return
    if span is None:
        _state.sessions.pop(session_id, None)
    else:
        _state.sessions[session_id] = span


def _claim(key: Hashable) -> Span | None:
    assert _state is not None
    queue = _state.expected.get(key)
    if not queue:
        return None
    span = queue.popleft()
    if not queue:
        del _state.expected[key]
    return span


# --- gRPC client side ------------------------------------------------------------------------


def _outgoing(details: grpc.aio.ClientCallDetails, request: Any) -> grpc.aio.ClientCallDetails:
    from opentelemetry import propagate, trace

    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    key = _call_key(method, request)
    span = _claim(key) if key is not None else None
    if key is not None and _state is not None:
        claimed = _state.claimed
        if span is not None:
            claimed[key] = span
            claimed.move_to_end(key)
            while len(claimed) > CLAIMED_KEPT:
                claimed.popitem(last=False)
        else:
            span = claimed.get(key)
    if span is None and _state is not None and _state.sessions:
        span = _state.sessions.get(getattr(request, "session_id", None))  # type: ignore[arg-type]
    ctx = trace.set_span_in_context(span) if span is not None else None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for k, v in carrier.items():
        metadata.add(k, v)
    return details._replace(metadata=metadata)


class _InjectUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_outgoing(client_call_details, request), request)


class _InjectUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_outgoing(client_call_details, request), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that carry the trace context on every call of a channel
    (none when tracing is off)."""
    return [_InjectUnaryUnary(), _InjectUnaryStream()] if _state is not None else []


# --- gRPC server side ------------------------------------------------------------------------


def _request_attributes(method: str, request: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if hasattr(request, "session_id"):
        attrs["dsi.session_id"] = request.session_id
    if hasattr(request, "context_token_ids"):
        attrs["dsi.context_tokens"] = _context_length(request)
    if method == VERIFY:
        attrs["dsi.base"] = _context_length(request)
        attrs["dsi.context_prefix_tokens"] = request.context_prefix_length
        attrs["dsi.drafts"] = len(request.draft_tokens)
    elif method == DRAFT:
        attrs["dsi.start"] = _context_length(request)
        attrs["dsi.context_prefix_tokens"] = request.context_prefix_length
        attrs["dsi.lookahead"] = request.lookahead
        attrs["dsi.max_tokens"] = request.max_tokens
    return attrs


def _response_attributes(method: str, response: Any) -> dict[str, Any]:
    if method == VERIFY and response is not None:
        return {
            "dsi.accepted": response.num_accepted,
            "dsi.cached_tokens": response.stats.cached_tokens,
            "dsi.computed_tokens": response.stats.computed_tokens,
            "dsi.queue_seconds": response.stats.queue_seconds,
        }
    return {}


def _wrap(method: str, behavior: Callable, streaming: bool) -> Callable:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    service, _, name = method.strip("/").rpartition("/")
    base_attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def start(request: Any, context: grpc.aio.ServicerContext) -> Span:
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        parent = propagate.extract(carrier)
        attrs = {**base_attrs, **_request_attributes(method, request)}
        return tracer().start_span(method.strip("/"), context=parent, kind=SpanKind.SERVER, attributes=attrs)

    def finish(span: Span, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        if exc is not None and _cancelled(exc):  # the client cancelled: not an error
            span.set_attribute("dsi.cancelled", True)
        else:
            code = context.code()
            if code is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code is not grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {context.details() or ''}"))
            elif exc is not None:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()

    if streaming and inspect.isasyncgenfunction(behavior):

        async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext):
            span = start(request, context)
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(span, context, error)

        return wrapped_gen

    async def wrapped(request: Any, context: grpc.aio.ServicerContext):
        span = start(request, context)
        token = otel_context.attach(trace.set_span_in_context(span))
        error: BaseException | None = None
        try:
            response = await behavior(request, context)
            span.set_attributes(_response_attributes(method, response))
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            finish(span, context, error)

    return wrapped


def _cancelled(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)


class _ServerInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _state is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(method, handler.unary_unary, False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(method, handler.unary_stream, True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client streaming: dsi has none


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A SERVER span per RPC, parented by the caller's trace context (none
    when tracing is off)."""
    return [_ServerInterceptor()] if _state is not None else []


# --- forward passes --------------------------------------------------------------------------


def instrument_backend(role: str, backend: LocalTarget | LocalDrafter) -> None:
    """A span per forward pass of a target or drafter, a child of the RPC
    that ran it; chained after any ``on_forward`` hook already set (metrics).
    Does nothing when tracing is off."""
    if _state is None:
        return
    from opentelemetry.trace import SpanKind

    tr = _state.tracer
    previous = backend.on_forward
    name = f"{role} forward"

    def on_forward(fwd: Forward) -> None:
        if previous is not None:
            previous(fwd)
        end = time.time_ns()
        span = tr.start_span(
            name,
            kind=SpanKind.INTERNAL,
            start_time=end - int(fwd.seconds * 1e9),
            attributes={
                "dsi.computed_tokens": fwd.computed_tokens,
                "dsi.cached_tokens": fwd.cached_tokens,
                "dsi.rows": len(fwd.scores),
            },
        )
        span.end(end_time=end)

    backend.on_forward = on_forward
