"""gRPC clients that implement the Target and Drafter interfaces.

Cancelling the asyncio task that awaits :meth:`GrpcTarget.verify`, or closing
the iterator of :meth:`GrpcDrafter.draft`, cancels the RPC on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from dsi.domain.errors import FailedPrecondition, Unavailable
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.prefix import SentSequences
from dsi.domain.types import (
    DecodeRequest,
    DraftChunk,
    DraftRequest,
    ServiceInfo,
    VerifyRequest,
    VerifyResult,
    is_chain,
)
from dsi.v1 import drafter_pb2, drafter_pb2_grpc, target_pb2, target_pb2_grpc
from dsi.wire import convert
from dsi.wire.call_stream import DraftStream, VerifyStream
from dsi.wire.grpc_status import call, to_domain
from dsi.wire.security import PLAINTEXT, ClientSecurity

#: Set to 0 to make every GrpcTarget use unary Verify calls even with targets that serve VerifyStream
#: and Decode, and every GrpcDrafter a Draft call per draft stream even with drafters that serve
#: DraftStream (for comparisons; the coordinator's ``--no-verify-stream`` does the same).
VERIFY_STREAM_ENV = "DSI_VERIFY_STREAM"


def verify_stream_default() -> bool:
    """Whether GrpcTargets use VerifyStream and Decode, and GrpcDrafters DraftStream, where they can,
    unless told: yes, unless $DSI_VERIFY_STREAM=0."""
    return os.environ.get(VERIFY_STREAM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _streams_wanted(asked: bool | None, interceptors: Sequence[grpc.aio.ClientInterceptor] | None) -> bool:
    """Whether a client sends its calls over a stream once its peer serves one:
    as ``asked`` (default: :func:`verify_stream_default`), and never with call
    interceptors (``interceptors``, or :data:`CHANNEL_INTERCEPTORS`: tracing),
    which act per call."""
    intercepted = bool(interceptors) or any(make() for make in CHANNEL_INTERCEPTORS)
    return (verify_stream_default() if asked is None else asked) and not intercepted


CHANNEL_OPTIONS = [
    # Responses (verifications, draft chunks, generated text, Info) are small: gRPC's own 4 MiB limit
    # leaves plenty of room. Requests are bounded by the receiving server (dsi.serving.gate.Policy).
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
]


#: Called for every new channel: interceptors to put first on it (dsi.serving.tracing adds its
#: trace-context propagation here when tracing is on; empty otherwise).
CHANNEL_INTERCEPTORS: list[Callable[[], Sequence[grpc.aio.ClientInterceptor]]] = []


def open_channel(
    address: str,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    security: ClientSecurity | None = None,
) -> grpc.aio.Channel:
    """A channel to ``address``; ``interceptors`` wrap every call on it (the
    benchmarks inject network delay this way, see dsi.tools.experiments.netdelay; interceptors of
    :data:`CHANNEL_INTERCEPTORS` come first); ``security``: TLS and a bearer token (default:
    plaintext, no token)."""
    interceptors = [*(i for make in CHANNEL_INTERCEPTORS for i in make()), *(interceptors or [])]
    return (security or PLAINTEXT).channel(address, CHANNEL_OPTIONS, interceptors or None)


async def wait_ready(channel: grpc.aio.Channel, name: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        raise Unavailable(f"{name} is unavailable: not reachable within {timeout:g}s") from None


#: Statuses a server stream (Decode, Draft) ends with when its peer went away mid-stream (INTERNAL
#: "Internal error from Core", CANCELLED by a stopping server, UNKNOWN): what came so far stands,
#: and the rest is the same from another instance, so they count as ``Unavailable`` (failover; a
#: drafter is left until it answers again). A real fault repeats there, and a generation ends after
#: its bounded retries.
_PEER_GONE = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})
T = TypeVar("T")
A = TypeVar("A")


async def server_stream(call: Any, from_pb: Callable[[Any], T], peer: str) -> AsyncIterator[T]:
    """The messages of a server-streaming ``call`` to ``peer``, converted;
    its status as the domain error; closing the iteration cancels the call."""
    try:
        async for msg in call:
            yield from_pb(msg)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _PEER_GONE:
            why = f"{exc.code().name}: {exc.details()}"
            raise Unavailable(f"{peer} is unavailable: its stream failed ({why})") from None
        raise to_domain(exc, peer) from None
    finally:
        call.cancel()


async def _converted(messages: AsyncIterator[Any], from_pb: Callable[[Any], T]) -> AsyncIterator[T]:
    """``messages`` converted; closing the iteration closes theirs."""
    try:
        async for msg in messages:
            yield from_pb(msg)
    finally:
        await messages.aclose()  # type: ignore[attr-defined]


async def _first(items: AsyncIterator[T]) -> tuple[AsyncIterator[T], T | None]:
    """``items`` and its first item (None: it ended without one); ``items``
    is closed when that fails."""
    try:
        return items, await anext(items, None)
    except BaseException:
        await items.aclose()  # type: ignore[attr-defined]
        raise


async def _opened(opening: Callable[[], Awaitable[tuple[AsyncIterator[T], T | None]]]) -> AsyncIterator[T]:
    """The items of the iterator ``opening()`` gives with its first item (as
    :func:`_first` does); closing the iteration closes it."""
    items, first = await opening()
    try:
        if first is None:
            return
        yield first
        async for item in items:
            yield item
    finally:
        await items.aclose()  # type: ignore[attr-defined]


R = TypeVar("R", VerifyRequest, DraftRequest)


def _with_prefix(request: R, length: int, digest: int, rest: Sequence[int]) -> R:
    """``request`` with its context given as ``rest`` after a prefix of ``length`` tokens (0: unchanged)."""
    if not length:
        return request
    return dataclasses.replace(request, context=rest, prefix_length=length, prefix_hash=digest)


class _PrefixSender:
    """Context prefixes (dsi.domain.prefix), the client's side, as
    :class:`GrpcTarget` and :class:`GrpcDrafter` send them: once the peer says
    it accepts them (Info), a request carries only the context past what its
    session was last sent, and the full context again when the peer refuses
    the prefix (FailedPrecondition: it does not hold it) before answering."""

    def __init__(self) -> None:
        #: what each session was last sent, once the peer said it accepts context prefixes (Info)
        self.sent: SentSequences | None = None
        self.prefix_requests = 0  # requests that sent a prefix instead of the full context
        self.prefix_misses = 0  # ... that the peer refused (it did not hold the prefix): resent in full

    def _accepts_prefixes(self, accepts: bool) -> None:
        """What Info said (ServiceLimits.accepts_context_prefix)."""
        if accepts and self.sent is None:
            self.sent = SentSequences()
        elif not accepts:
            self.sent = None  # e.g. replaced by an older build behind the same address

    async def _send_prefixed(
        self,
        session_id: str,
        context: Sequence[int],
        holds: list[int] | None,
        send: Callable[[int, int, Sequence[int]], Awaitable[A]],
    ) -> A:
        """``await send(length, digest, rest)``: the context as the prefix of
        what the session was last sent and the tokens after it (or ``0, 0,
        context``), and with the full context again when the peer refuses the
        prefix. ``holds``: what the session holds once the peer took the
        request, recorded when ``send`` returns (concurrent requests of the
        session name only a prefix it shares, see
        :meth:`SentSequences.split`); None: not tracked, the session is
        forgotten (its next request carries the full context)."""
        sent = self.sent
        assert sent is not None
        length, digest, rest = sent.split(session_id, context)
        if holds is None:
            sent.forget(session_id)
        else:
            sent.sending(session_id, holds)
        ok = False
        try:
            if not length:
                answer = await send(0, 0, context)
            else:
                self.prefix_requests += 1
                try:
                    answer = await send(length, digest, rest)
                except FailedPrecondition:
                    self.prefix_misses += 1
                    answer = await send(0, 0, context)
            ok = True
        finally:
            if holds is not None:
                sent.done(session_id, holds, ok)
        return answer


class GrpcTarget(Target, _PrefixSender):
    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        security: ClientSecurity | None = None,
        server_name: str | None = None,
        verify_stream: bool | None = None,
    ) -> None:
        """``server_name``: the name its TLS certificate carries, when it is
        dialled by another (a replica found by DNS, dialled by IP address).

        ``verify_stream``: send verifications over one VerifyStream, and
        decode with Decode calls, once :meth:`info` says the target serves
        them (default: :func:`verify_stream_default`). Not with call interceptors
        (``interceptors``, or :data:`CHANNEL_INTERCEPTORS`: tracing): they act
        per call, so verifications then stay unary Verify calls, each
        delayed or traced as before."""
        _PrefixSender.__init__(self)
        self.name = f"target {address}"
        self.address = address
        self._own_channel = channel is None
        if security is not None and server_name:
            security = security.for_name(server_name)
        self._stream_wanted = _streams_wanted(verify_stream, interceptors)
        self.channel = channel or open_channel(address, interceptors, security)
        self.stub = target_pb2_grpc.TargetServiceStub(self.channel)
        self.timeout = timeout
        #: the stream verifications go over, once the target said it serves one (Info); None: unary Verify
        self.stream: VerifyStream | None = None
        self._stream_client = VerifyStream(self.stub, self.name, timeout)
        #: whether :meth:`decode` uses the Decode RPC (the target said it serves it, in Info)
        self.decodes_streamed = False

    async def info(self) -> ServiceInfo:
        resp = await call(self.name, self.stub.Info(target_pb2.TargetServiceInfoRequest(), timeout=self.timeout))
        info = convert.service_info_from_pb(resp)
        self._accepts_prefixes(info.limits.accepts_context_prefix)
        use_stream = self._stream_wanted and info.limits.accepts_verify_stream
        self.stream = self._stream_client if use_stream else None
        self.decodes_streamed = self._stream_wanted and info.limits.accepts_decode
        return info

    @property
    def stream_calls(self) -> int:
        """Verifications sent over a VerifyStream so far."""
        return self._stream_client.calls

    async def _verify(self, request: VerifyRequest) -> VerifyResult:
        pb = convert.verify_request_to_pb(request)
        stream = self.stream
        if stream is not None:
            return convert.verify_result_from_pb(await stream.verify(pb))
        resp = await call(self.name, self.stub.Verify(pb, timeout=self.timeout))
        return convert.verify_result_from_pb(resp)

    async def verify(self, request: VerifyRequest) -> VerifyResult:
        """Sends only the context past what the session was last sent (when
        the target accepts prefixes), and the full context again when the
        target no longer holds it."""
        if self.sent is None or request.prefix_length:
            return await self._verify(request)
        drafts = [d.token_id for d in request.drafts] if is_chain(request.drafts) else []
        holds = [*request.context, *drafts]  # what the session holds once the target took this request
        return await self._send_prefixed(
            request.session_id,
            request.context,
            holds,
            lambda length, digest, rest: self._verify(_with_prefix(request, length, digest, rest)),
        )

    async def decode(self, request: DecodeRequest) -> AsyncIterator[VerifyResult]:
        """One Decode call (a message per token) when the target serves it,
        sending only the context past what the session was last sent (the
        full context again when the target no longer holds it); otherwise
        Verify calls without drafts (:meth:`Target.decode`). Closing the
        iteration cancels the call."""
        if not self.decodes_streamed:
            async for result in super().decode(request):
                yield result
            return
        start = request.start
        if self.sent is None or start.prefix_length:
            async for result in self._decode(request):
                yield result
            return
        # The session holds the context once the call is taken, and grows by a token a step: the
        # context of the last step that answered (at least) when the call ends, however it ends.
        context = list(start.context)
        opened = _opened(
            lambda: self._send_prefixed(
                start.session_id,
                start.context,
                context,
                lambda length, digest, rest: _first(
                    self._decode(dataclasses.replace(request, start=_with_prefix(start, length, digest, rest)))
                ),
            )
        )
        tokens: list[int] = []
        try:
            async with contextlib.aclosing(opened) as results:  # closing this iteration cancels the call
                async for result in results:
                    tokens.append(result.next_token)
                    yield result
        finally:
            if len(tokens) > 1 and self.sent is not None:
                self.sent.record(start.session_id, [*context, *tokens[:-1]])

    def _decode(self, request: DecodeRequest) -> AsyncIterator[VerifyResult]:
        call = self.stub.Decode(convert.decode_request_to_pb(request))
        return server_stream(call, convert.decoded_from_pb, self.name)

    async def release_session(self, session_id: str) -> bool:
        if self.sent is not None:
            self.sent.forget(session_id)
        req = target_pb2.TargetServiceReleaseSessionRequest(session_id=session_id)
        resp = await call(self.name, self.stub.ReleaseSession(req, timeout=self.timeout))
        return resp.released

    async def close(self) -> None:
        await self._stream_client.close()
        if self._own_channel:
            await self.channel.close()


class GrpcDrafter(Drafter, _PrefixSender):
    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        security: ClientSecurity | None = None,
        server_name: str | None = None,
        draft_stream: bool | None = None,
    ) -> None:
        """``server_name``: the name its TLS certificate carries, when it is
        dialled by another (a replica found by DNS, dialled by IP address).

        ``draft_stream``: send draft calls over one DraftStream once
        :meth:`info` says the drafter serves it (default:
        :func:`verify_stream_default`); not with call interceptors, as
        :class:`GrpcTarget`'s VerifyStream."""
        _PrefixSender.__init__(self)
        self.name = f"drafter {address}"
        self.address = address
        self._own_channel = channel is None
        if security is not None and server_name:
            security = security.for_name(server_name)
        self._stream_wanted = _streams_wanted(draft_stream, interceptors)
        self.channel = channel or open_channel(address, interceptors, security)
        self.stub = drafter_pb2_grpc.DrafterServiceStub(self.channel)
        self.timeout = timeout
        #: the stream draft calls go over, once the drafter said it serves one (Info); None: Draft calls
        self.stream: DraftStream | None = None
        self._stream_client = DraftStream(self.stub, self.name)

    async def info(self) -> ServiceInfo:
        resp = await call(self.name, self.stub.Info(drafter_pb2.DrafterServiceInfoRequest(), timeout=self.timeout))
        info = convert.service_info_from_pb(resp)
        self._accepts_prefixes(info.limits.accepts_context_prefix)
        self.stream = self._stream_client if self._stream_wanted and info.limits.accepts_draft_stream else None
        return info

    @property
    def stream_calls(self) -> int:
        """Draft calls sent over a DraftStream so far."""
        return self._stream_client.calls

    def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        """Sends only the context past the one the session was last sent
        (when the drafter accepts prefixes), and the full context again when
        the drafter no longer holds it (refused before its first chunk)."""
        if self.sent is None or request.prefix_length:
            return self._draft(request)
        context = list(request.context)  # held once the drafter took the request: its first chunk came, or its end
        return _opened(
            lambda: self._send_prefixed(
                request.session_id,
                context,
                context,
                lambda length, digest, rest: _first(self._draft(_with_prefix(request, length, digest, rest))),
            )
        )

    def _draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        pb = convert.draft_request_to_pb(request)
        if self.stream is not None:
            return _converted(self.stream.draft(pb), convert.draft_chunk_from_pb)
        return server_stream(self.stub.Draft(pb), convert.draft_chunk_from_pb, self.name)

    async def release_session(self, session_id: str) -> bool:
        if self.sent is not None:
            self.sent.forget(session_id)
        req = drafter_pb2.DrafterServiceReleaseSessionRequest(session_id=session_id)
        resp = await call(self.name, self.stub.ReleaseSession(req, timeout=self.timeout))
        return resp.released

    async def close(self) -> None:
        await self._stream_client.close()
        if self._own_channel:
            await self.channel.close()
