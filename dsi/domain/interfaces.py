"""The abstract async interfaces the algorithms talk to.

The coordinator's strategies see only :class:`Target` and :class:`Drafter`.
In-process backends (:mod:`dsi.backends`) implement them directly; gRPC
clients (:mod:`dsi.wire.transport`) implement them over the network. One algorithm,
two transports.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator

from dsi.domain import validation
from dsi.domain.types import DecodeRequest, DraftChunk, DraftRequest, ServiceInfo, VerifyRequest, VerifyResult


class Target(abc.ABC):
    """One target model instance (one device)."""

    #: Human-readable name used in logs and error messages (an address for
    #: remote instances).
    name: str = "target"

    @abc.abstractmethod
    async def info(self) -> ServiceInfo: ...

    @abc.abstractmethod
    async def verify(self, request: VerifyRequest) -> VerifyResult:
        """One forward pass over context + drafts; see the Verify RPC."""

    async def decode(self, request: DecodeRequest) -> AsyncIterator[VerifyResult]:
        """Target-only decoding: the result of every step, each a :meth:`verify`
        without drafts on the context so far, until ``max_tokens`` steps or a
        stop token (yielded). Closing the iteration stops it within one step.
        This default makes those calls; a transport may do better (one
        message per token: the Decode RPC)."""
        step = request.start
        validation.check_decode(request.max_tokens, step.drafts)
        context = list(step.context)
        for n in range(request.max_tokens):
            result = await self.verify(step)
            yield result
            if result.next_token in request.stop_token_ids or n + 1 == request.max_tokens:
                return
            context = [*context, result.next_token]
            step = dataclasses.replace(step, context=context)

    @abc.abstractmethod
    async def release_session(self, session_id: str) -> bool: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources."""


class Drafter(abc.ABC):
    """One drafter model instance (one device)."""

    name: str = "drafter"

    @abc.abstractmethod
    async def info(self) -> ServiceInfo: ...

    @abc.abstractmethod
    def draft(self, request: DraftRequest) -> AsyncIterator[DraftChunk]:
        """Stream drafted chunks; closing or cancelling the iteration stops
        drafting within one token step."""

    @abc.abstractmethod
    async def release_session(self, session_id: str) -> bool: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources."""
