"""The abstract async interfaces the algorithms talk to.

The coordinator's strategies see only :class:`Target` and :class:`Drafter`.
In-process backends (:mod:`dsi.backends`) implement them directly; gRPC
clients (:mod:`dsi.wire.transport`) implement them over the network. One algorithm,
two transports.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from dsi.domain.types import DraftChunk, DraftRequest, ServiceInfo, VerifyRequest, VerifyResult


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
