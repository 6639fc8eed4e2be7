"""Injected network delay: grpc.aio client interceptors that add a fixed
one-way delay to every message on a link (the machines here cannot shape
traffic, so the coordinator's client channels do it).

A unary call waits ``delay`` before the request leaves and ``delay`` after the
response arrives (one round trip = ``2 * delay``). A server stream waits
``delay`` before the request leaves, and each streamed message is released
``delay`` after it arrived, whatever the consumer is doing (a background task
stamps the arrival times), so chunks keep their spacing. Cancelling the call
cancels the RPC at once: cancellation itself is not delayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

_END = object()


class DelayUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        await asyncio.sleep(self.delay_s)
        call = await continuation(client_call_details, request)
        response = await call
        await asyncio.sleep(self.delay_s)
        return response


class DelayUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        await asyncio.sleep(self.delay_s)
        call = await continuation(client_call_details, request)
        return _delayed(call, self.delay_s)


async def _delayed(call: Any, delay_s: float) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, Any, BaseException | None]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for msg in call:
                queue.put_nowait((loop.time() + delay_s, msg, None))
        except BaseException as exc:  # the RPC failed or was cancelled
            queue.put_nowait((loop.time() + delay_s, _END, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait((loop.time() + delay_s, _END, None))

    task = asyncio.ensure_future(pump())
    try:
        while True:
            due, msg, exc = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if msg is _END:
                if exc is not None and not isinstance(exc, asyncio.CancelledError):
                    raise exc
                return
            yield msg
    finally:
        task.cancel()
        call.cancel()


def interceptors(delay_ms: float) -> list[grpc.aio.ClientInterceptor] | None:
    """Interceptors adding ``delay_ms`` one way, or None for no delay."""
    if delay_ms <= 0:
        return None
    d = delay_ms / 1000.0
    return [DelayUnaryUnary(d), DelayUnaryStream(d)]
