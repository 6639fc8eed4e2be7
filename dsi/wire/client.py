"""A small Python client of dsi.v1.GenerationService (used by ``dsi generate``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from dsi.domain.timeline import Timeline
from dsi.domain.types import TreeShape
from dsi.v1 import generation_pb2, generation_pb2_grpc
from dsi.wire import convert
from dsi.wire.grpc_status import call, to_domain
from dsi.wire.security import ClientSecurity
from dsi.wire.transport import open_channel

#: ``request(lookahead=AUTO)``: the lookahead chosen as the generation runs, whatever the server's default.
AUTO = -1

STRATEGIES = {
    "nonsi": generation_pb2.STRATEGY_NONSI,
    "si": generation_pb2.STRATEGY_SI,
    "dsi": generation_pb2.STRATEGY_DSI,
    "": generation_pb2.STRATEGY_UNSPECIFIED,
}
FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in generation_pb2.FinishReason.items()}


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "unspecified"
    stats: dict[str, Any] = field(default_factory=dict)
    #: the schedule, when the request asked for it (GenerateRequest.timeline)
    timeline: Timeline | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats,
        }


def stats_dict(s: generation_pb2.GenerationStats) -> dict[str, Any]:
    """The stats as plain Python values (the per-drafter ones as a list of dicts)."""
    out: dict[str, Any] = {f.name: getattr(s, f.name) for f in s.DESCRIPTOR.fields}
    out["drafters"] = [{f.name: getattr(d, f.name) for f in d.DESCRIPTOR.fields} for d in s.drafters]
    return out


class Client:
    """``security``: TLS (mutual with a client certificate) and a bearer token
    (:class:`~dsi.wire.security.ClientSecurity`; default: plaintext, no token)."""

    def __init__(self, address: str, security: ClientSecurity | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, security=security)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.name = f"coordinator {address}"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def info(self) -> generation_pb2.GetInfoResponse:
        return await call(self.name, self.stub.GetInfo(generation_pb2.GetInfoRequest()))

    async def stream(self, request: generation_pb2.GenerateRequest) -> AsyncIterator[generation_pb2.GenerateResponse]:
        responses = self.stub.Generate(request)
        try:
            async for msg in responses:
                yield msg
        except grpc.aio.AioRpcError as exc:
            raise to_domain(exc, self.name) from None
        finally:
            responses.cancel()

    async def generate(
        self, request: generation_pb2.GenerateRequest, on_text: Callable[[str], None] | None = None
    ) -> Result:
        out = Result()
        async for msg in self.stream(request):
            out.token_ids.extend(msg.token_ids)
            out.text += msg.text
            if on_text is not None and msg.text:
                on_text(msg.text)
            if msg.finish_reason:
                out.finish_reason = FINISH_NAMES[msg.finish_reason]
                out.stats = stats_dict(msg.stats)
                if msg.HasField("timeline"):
                    out.timeline = convert.timeline_from_pb(msg.timeline)
        return out


def request(
    prompt: str = "",
    prompt_ids: list[int] | None = None,
    max_new_tokens: int = 0,
    strategy: str = "",
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    lookahead: int = 0,  # 0: the server default; AUTO: chosen as the generation runs
    stop: list[str] | None = None,
    tree: TreeShape | None = None,
    timeline: bool = False,
) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        prompt_token_ids=prompt_ids or [],
        max_new_tokens=max_new_tokens,
        strategy=STRATEGIES[strategy],
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,  # None leaves it unset: the server draws one and reports it
        lookahead=0 if lookahead == AUTO else lookahead,  # any other negative is refused by protobuf
        auto_lookahead=lookahead == AUTO,
        stop=stop or [],
        tree=None if tree is None else convert.tree_to_pb(tree),  # None: the server's default shape
        timeline=timeline,
    )
