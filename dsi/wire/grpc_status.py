"""The one place where domain errors and gRPC status codes meet.

Servers call :func:`abort_with` (through :func:`guard`) to turn a domain error
into a status; clients call :func:`to_domain` to turn an ``AioRpcError`` back
into a domain error that names the peer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from dsi.domain import errors

log = logging.getLogger(__name__)

_TO_STATUS: list[tuple[type[errors.DsiError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
]
_FROM_STATUS: dict[grpc.StatusCode, type[errors.DsiError]] = {code: cls for cls, code in _TO_STATUS}
# A peer that does not answer within a deadline is as good as unreachable (to the coordinator, which
# then tries another one).
_FROM_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] = errors.Unavailable
# A client never gets CANCELLED for a call it cancelled itself (grpc.aio raises
# asyncio.CancelledError then), and no dsi server sends it: it means the peer
# dropped the call, as a server does with calls that reach it as it shuts down.
_FROM_STATUS[grpc.StatusCode.CANCELLED] = errors.Unavailable


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in _TO_STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def to_domain(exc: grpc.aio.AioRpcError, peer: str) -> errors.DsiError:
    """A domain error for a failed call to ``peer``."""
    return from_status(exc.code(), exc.details(), peer)


def from_status(code: grpc.StatusCode, details: str | None, peer: str) -> errors.DsiError:
    """A domain error for a call to ``peer`` that ended with ``code`` and ``details``."""
    cls = _FROM_STATUS.get(code, errors.Internal)
    detail = details or code.name
    if cls is errors.Unavailable:
        return cls(f"{peer} is unavailable: {detail}")
    return cls(f"{peer}: {detail}")


_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def code_number(code: grpc.StatusCode) -> int:
    """The number of a status code on the wire (google.rpc.Code)."""
    return code.value[0]


def code_of_number(number: int) -> grpc.StatusCode:
    """The status code numbered ``number`` (an unknown number: UNKNOWN)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


F = TypeVar("F", bound=Callable[..., Any])


def guard(method: F) -> F:
    """Wrap a unary servicer method: domain errors become statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            fail(context, exc, method.__qualname__)
        return None

    return wrapper  # type: ignore[return-value]


def guard_stream(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap a server-streaming servicer method the same way."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            fail(context, exc, method.__qualname__)

    return wrapper


def fail(context: grpc.aio.ServicerContext, exc: BaseException, where: str = "") -> None:
    """Set the status of ``exc`` on the call; the handler then returns, and
    gRPC ends the call with that status (a non-OK status discards any response).

    Not ``context.abort()``: that raises an exception which keeps the handler's
    frames, and with them the request, alive in a reference cycle until the
    garbage collector runs; on a quiet server that is a refused request's
    memory held for minutes."""
    code, message = status_logged(exc, where)
    context.set_code(code)
    context.set_details(message)


def status_logged(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str]:
    """:func:`status_of`, logging an unexpected error (INTERNAL) with its traceback."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", where or "a call", exc_info=exc)
    return code, message


async def call(peer: str, awaitable: Awaitable[Any]) -> Any:
    """Await a client call, turning RPC errors into domain errors."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise to_domain(exc, peer) from None
