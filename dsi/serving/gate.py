"""The gate every gRPC call passes before a servicer sees it: one server
interceptor (:class:`Gate`) that

* checks the bearer token, when the server has one (``--auth-token-file``):
  a call without ``authorization: Bearer <token>`` ends UNAUTHENTICATED, its
  request unparsed. Health checks stay open (Kubernetes probes and load
  balancers send no token; they learn nothing but SERVING / NOT_SERVING);
* caps the calls that do model work (a target's Verify, a drafter's Draft) in
  flight at once, queued ones included (``--max-concurrent-requests``): one
  more ends RESOURCE_EXHAUSTED at once, instead of queueing without bound.
  A capped method whose requests are a stream of calls (a target's
  VerifyStream) is not counted itself: its servicer counts each call it
  carries against the same cap (:func:`stream_admission`);
* turns request bytes that do not parse into INVALID_ARGUMENT with a message
  (gRPC itself would answer UNKNOWN and log an ERROR with a traceback).

The statuses come from :mod:`dsi.wire.grpc_status`, the one place where
errors become statuses. The HTTP servers' counterpart of the token check is in
:mod:`dsi.serving.web`.
"""

from __future__ import annotations

import argparse
import contextvars
import inspect
import os
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dsi.domain.errors import DsiError, InvalidArgument, ResourceExhausted, Unauthenticated
from dsi.wire.grpc_status import fail, status_of
from dsi.wire.security import AUTHORIZATION, TOKEN_ENV, ClientSecurity, ServerSecurity, token_matches

#: Methods anyone may call: health checks (probes cannot send a token, or a client certificate either,
#: which is why ``--health-port`` serves them on a plaintext port of their own).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

DEFAULT_MAX_CONCURRENT_REQUESTS = 1024


class Admission:
    """What a servicer of a stream of calls asks before it starts one call."""

    def admit(self) -> DsiError | None:
        """Why the call is refused, or None: it is admitted, and counted until :meth:`release`."""
        return None

    def release(self) -> None:
        """An admitted call ended."""


#: No cap.
UNCAPPED = Admission()
_STREAM_ADMISSION: contextvars.ContextVar[Admission] = contextvars.ContextVar("dsi_stream_admission", default=UNCAPPED)


def stream_admission() -> Admission:
    """The cap a stream that carries many calls (a target's VerifyStream)
    applies to each call, inside its servicer: the gate's, when it caps the
    stream's method; :data:`UNCAPPED` otherwise."""
    return _STREAM_ADMISSION.get()


class Malformed:
    """What the request deserializer returns for bytes that do not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, ValueError, TypeError) as exc:  # protobuf raises DecodeError; be safe with the others
            return Malformed(exc)

    return parse


def _malformed(what: Malformed) -> InvalidArgument:
    return InvalidArgument(f"the request is not a valid protobuf message: {what.error}")


_MAKERS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class Gate(grpc.aio.ServerInterceptor, Admission):
    def __init__(
        self,
        token: str | None = None,
        max_concurrent: int = 0,
        limited: Collection[str] = (),
        open_prefixes: tuple[str, ...] = OPEN_PREFIXES,
    ) -> None:
        self.token = token
        #: 0 = no cap
        self.max_concurrent = max_concurrent
        #: full method names (``/dsi.v1.TargetService/Verify``) the cap counts
        self.limited = frozenset(limited)
        self.open_prefixes = open_prefixes
        self.in_flight = 0
        #: the wrapped handler of each method (a server's handlers do not change once it runs)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method: str = handler_call_details.method
        if self.token and not method.startswith(self.open_prefixes):
            values = [v for k, v in handler_call_details.invocation_metadata or () if k == AUTHORIZATION]
            if not any(token_matches(v, self.token) for v in values if isinstance(v, str)):
                reason = "invalid bearer token" if values else "missing bearer token"
                return self._refuse(
                    handler, Unauthenticated(f"{reason}: send the metadata 'authorization: Bearer <token>'")
                )
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._wrap(handler, self.max_concurrent > 0 and method in self.limited)
        return wrapped

    # --- the cap (Admission) ---------------------------------------------------------------

    def admit(self) -> DsiError | None:
        if self.max_concurrent <= 0:
            return None
        if self.in_flight >= self.max_concurrent:
            return ResourceExhausted(
                f"this server is handling its limit of {self.max_concurrent} concurrent requests"
                " (--max-concurrent-requests); retry later"
            )
        self.in_flight += 1
        return None

    def release(self) -> None:
        if self.max_concurrent > 0:
            self.in_flight -= 1

    # --- handlers -------------------------------------------------------------------------

    def _refuse(self, handler: grpc.RpcMethodHandler, error: DsiError) -> grpc.RpcMethodHandler:
        """A handler of the same kind that ends the call with ``error``, without
        parsing the request."""
        _, make = _MAKERS[(handler.request_streaming, handler.response_streaming)]

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            fail(context, error)

        return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)

    def _wrap(self, handler: grpc.RpcMethodHandler, capped: bool) -> grpc.RpcMethodHandler:
        attr, make = _MAKERS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, attr)
        streaming_request = handler.request_streaming
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous handler (none in dsi): left as it is

        # A capped stream of calls is not counted itself: its servicer counts each call (stream_admission).
        per_call = capped and streaming_request
        capped = capped and not streaming_request

        def refusal(request: Any) -> DsiError | None:
            """Why the call is refused, or None: it is admitted (and counted)."""
            if isinstance(request, Malformed):
                return _malformed(request)
            return self.admit() if capped else None

        def leave() -> None:
            if capped:
                self.release()

        # A refusal sets the status and returns (see dsi.wire.grpc_status.fail: no exception keeps the
        # request alive), and the request is dropped at once.
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                error = refusal(request)
                if error is not None:
                    del request
                    fail(context, error)
                    return
                lent = _STREAM_ADMISSION.set(self) if per_call else None
                try:
                    messages = _checked(request, context) if streaming_request else request
                    del request
                    async for item in behavior(messages, context):
                        yield item
                finally:
                    leave()
                    if lent is not None:
                        _STREAM_ADMISSION.reset(lent)

            wrapped: Callable[..., Any] = wrapped_gen
        else:

            async def wrapped_coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
                error = refusal(request)
                if error is not None:
                    del request
                    fail(context, error)
                    return None
                lent = _STREAM_ADMISSION.set(self) if per_call else None
                try:
                    messages = _checked(request, context) if streaming_request else request
                    del request
                    return await behavior(messages, context)
                finally:
                    leave()
                    if lent is not None:
                        _STREAM_ADMISSION.reset(lent)

            wrapped = wrapped_coro
        return make(
            wrapped,
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


async def _checked(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """A request stream whose malformed messages end the call."""
    async for request in requests:
        if isinstance(request, Malformed):
            code, message = status_of(_malformed(request))
            await context.abort(code, message)
        yield request


# --- a server's policy ---------------------------------------------------------------------

#: The smallest request-size limit, whatever the context limit: room for any ordinary request
#: (16 stop strings of 256 characters take 16 KiB).
MIN_MESSAGE_BYTES = 256 << 10
#: Bytes allowed per token of the context limit: a token id takes at most 5 bytes on the wire, and a
#: text prompt rarely averages more than a few bytes per token (English text about 4), so 16 leaves margin.
MESSAGE_BYTES_PER_TOKEN = 16


def default_message_limit(max_context: int) -> int:
    """The largest request a server accepts by default: a prompt (or context)
    of ``max_context`` tokens with margin, as ids or as text; at least 256 KiB."""
    return max(MIN_MESSAGE_BYTES, MESSAGE_BYTES_PER_TOKEN * max_context)


@dataclass(frozen=True)
class Policy:
    """What a gRPC server lets in: who (TLS, mutual TLS, a bearer token), how
    big a request (bytes), and how many model calls at once."""

    security: ServerSecurity = field(default_factory=ServerSecurity)
    #: largest request message accepted; a larger one is refused RESOURCE_EXHAUSTED before it is parsed
    max_message_bytes: int = MIN_MESSAGE_BYTES
    #: calls of ``limited`` methods in flight at once (0 = no cap)
    max_concurrent: int = 0
    limited: frozenset[str] = frozenset()
    #: a plaintext, token-free port serving only grpc.health.v1 (None = none)
    health_port: int | None = None

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.max_receive_message_length", self.max_message_bytes)]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [Gate(self.security.token, self.max_concurrent, self.limited)]


# --- command line -----------------------------------------------------------------------------


def add_server_arguments(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """Every server's flags: TLS, token, health port, request size."""
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain (default: plaintext)")
    g.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    g.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="require client certificates signed by this PEM CA bundle (mutual TLS; needs --tls-cert)",
    )
    g.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="require 'authorization: Bearer <token>' with the token in FILE on every gRPC call (health checks"
        " excepted) and HTTP request (/health excepted); default: no token",
    )
    g.add_argument(
        "--health-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve grpc.health.v1 alone, plaintext and without token, on HOST:PORT (for Kubernetes gRPC"
        " probes, which speak neither TLS nor tokens; default: off)",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=0,
        metavar="N",
        help=f"largest gRPC request accepted; larger ones are refused RESOURCE_EXHAUSTED unread (default 0: room"
        f" for a prompt of the context limit, {MESSAGE_BYTES_PER_TOKEN} bytes per token, at least 256 KiB)",
    )


def add_concurrency_argument(p: argparse._ArgumentGroup | argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        metavar="N",
        help=f"{what} in flight at once, queued ones included; more are refused RESOURCE_EXHAUSTED"
        " (0 = no cap; default: %(default)s)",
    )


def security_from_args(args: argparse.Namespace) -> ServerSecurity:
    """A server's TLS and token from its command line; checked at once, before
    anything slow (loading a model) starts."""
    return ServerSecurity.create(args.tls_cert, args.tls_key, args.tls_ca, args.auth_token_file)


def policy_from_args(
    args: argparse.Namespace,
    max_context: int,
    limited: Collection[str] = (),
    security: ServerSecurity | None = None,
) -> Policy:
    """A server's :class:`Policy` from its command line (the flags above)."""
    security = security or security_from_args(args)
    size = args.max_message_bytes or default_message_limit(max_context)
    if size < 1024:
        raise InvalidArgument(f"--max-message-bytes must be 0 (automatic) or at least 1024, got {size}")
    cap = getattr(args, "max_concurrent_requests", 0)
    if cap < 0:
        raise InvalidArgument(f"--max-concurrent-requests must be >= 0, got {cap}")
    return Policy(security, size, cap, frozenset(limited), args.health_port)


def add_client_arguments(g: argparse._ArgumentGroup | argparse.ArgumentParser, prefix: str = "") -> None:
    """A client's flags (``dsi generate``; with ``prefix="peer-"`` the
    coordinator's to its targets and drafters): TLS, mutual TLS, token."""
    whom = "targets and drafters" if prefix else "the coordinator"
    g.add_argument(
        f"--{prefix}tls",
        action="store_true",
        help=f"talk TLS to {whom}, checking certificates against the system's roots",
    )
    g.add_argument(
        f"--{prefix}tls-ca",
        metavar="FILE",
        help=f"talk TLS to {whom}, checking certificates against this PEM CA bundle",
    )
    g.add_argument(f"--{prefix}tls-cert", metavar="FILE", help=f"present this PEM certificate to {whom} (mutual TLS)")
    g.add_argument(f"--{prefix}tls-key", metavar="FILE", help=f"the PEM private key of --{prefix}tls-cert")
    g.add_argument(
        f"--{prefix}tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must carry (default: the host dialled"
        + ("; for dns:///NAME:PORT, NAME)" if prefix else ")"),
    )
    g.add_argument(
        f"--{prefix}auth-token-file",
        metavar="FILE",
        help=f"send 'authorization: Bearer <token>' with the token in FILE to {whom}"
        + ("" if prefix else f" (default: ${TOKEN_ENV}, if set)"),
    )


def client_from_args(args: argparse.Namespace, prefix: str = "") -> ClientSecurity:
    attr = prefix.replace("-", "_")

    def get(name: str) -> Any:
        return getattr(args, f"{attr}{name}", None)

    token = None if prefix else os.environ.get(TOKEN_ENV)
    return ClientSecurity.create(
        bool(get("tls")),
        get("tls_ca"),
        get("tls_cert"),
        get("tls_key"),
        get("tls_server_name"),
        get("auth_token_file"),
        token,
    )
