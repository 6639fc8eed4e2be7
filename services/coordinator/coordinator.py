"""The coordinator's domain layer: requests in, streamed text out.

Connects to targets and drafters, checks they share one vocabulary, applies
server defaults, tokenizes prompts, detokenizes output incrementally and
applies stop strings. The engine (:mod:`services.coordinator.engine`) does the
speculation; the gRPC servicer is a thin translation of this.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dsi.domain.errors import InvalidArgument, ResourceExhausted, Unavailable
from dsi.domain.interfaces import Drafter, Target
from dsi.domain.timeline import Timeline
from dsi.domain.types import CHAIN, SamplingParams, ServiceInfo, TreeShape
from services.coordinator import tracing
from services.coordinator.engine import Engine, FinishReason, Generation, GenerationParams, GenerationStats, Strategy
from services.coordinator.engine.observe import Observer
from services.coordinator.observers import combine
from services.coordinator.pool import Pool
from services.coordinator.timeline import TimelineRecorder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    strategy: Strategy = Strategy.DSI
    #: 0: automatic, chosen as each generation runs (docs/benchmarks.md, "Automatic lookahead": within 3% of
    #: the best fixed lookahead on the virtual clock's grid, 0.80 of k = 5 for DSI on the H200's latencies)
    lookahead: int = 0
    #: used when a request gives none, cut to the room the context leaves; 0 = up to the context limit
    max_new_tokens: int = 128
    max_sp_degree: int = 0  # 0 = every target replica
    tree: TreeShape = CHAIN  # drafts as a token tree of this shape when a request sets none
    #: generations at once (gRPC and HTTP together); more are refused RESOURCE_EXHAUSTED.
    #: 0 = as many as the replicas have sessions for (see :meth:`Coordinator.max_generations`)
    max_generations: int = 0
    #: seconds a verification may take at most (and before its replica's latency is measured; after,
    #: its deadline follows that latency): a replica that takes longer is down, the work goes elsewhere
    verify_timeout: float = 60.0
    #: seconds a drafter may take for its next chunk before the generation goes on without it
    draft_timeout: float = 10.0


#: Stop strings per request, and characters per stop string (every API): each is searched for after
#: every token, and text that may begin one is held back.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: The cap on generations when neither --max-generations nor the replicas' session limits say otherwise.
DEFAULT_MAX_GENERATIONS = 256


def check_stops(stops: Sequence[str]) -> None:
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_LENGTH:
            raise InvalidArgument(f"stop string {i} has {len(s)} characters; at most {MAX_STOP_LENGTH}")


@dataclass(frozen=True)
class GenerateInput:
    prompt: str = ""
    prompt_token_ids: Sequence[int] = ()
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    #: None: a fresh random seed (reported in the stats)
    seed: int | None = None
    strategy: Strategy | None = None
    lookahead: int = 0  # 0: the server default
    #: choose the lookahead as the generation runs, whatever the server default (``lookahead`` must be 0)
    auto_lookahead: bool = False
    stop: Sequence[str] = ()
    #: None: the server default
    tree: TreeShape | None = None
    #: also return the generation's schedule (GenerateOutput.timeline, on the last output)
    timeline: bool = False
    #: seconds the client waits for the whole answer (its gRPC deadline); no call to a peer outlives it
    timeout: float | None = None


@dataclass
class GenerateOutput:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    #: the schedule, on the last output, when the request asked for it
    timeline: Timeline | None = None


# --- text ----------------------------------------------------------------------


class Codec:
    """Tokenizer seam: HF tokenizers, or ids-as-text for synthetic models."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument(
                "this coordinator has no tokenizer (synthetic models or no --tokenizer): send prompt_token_ids"
            )
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Incremental detokenization with stop strings.

    Text is emitted only once it is final: an incomplete UTF-8 sequence at the
    end (decoded as U+FFFD) and any tail that could begin a stop string are held
    back until the next tokens decide them.

    Each push decodes a short window, not the whole output (O(1) per token, not
    O(n)): the tokens since the one before the last final text, whose decoded
    text minus that of its settled part is the new text (a token's text can
    depend on the one before it, e.g. a leading space).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str], separator: str = "") -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""  # final text so far
        self._prefix = self._read = 0  # window: ids[_prefix:]; ids[_prefix:_read] is settled
        self._stopped = False

    def _advance(self, final: bool) -> None:
        if self._stopped:  # the text ends at the stop string
            return
        settled = self.decode(self.ids[self._prefix : self._read])
        window = self.decode(self.ids[self._prefix :])
        if len(window) > len(settled) and (final or not window.endswith("\ufffd")):
            self.text += window[len(settled) :]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Add tokens; returns (text that is final now, whether a stop string
        was found, in which case the text ends right before it)."""
        self.ids.extend(ids)
        self._advance(final=False)
        for s in self.stops:
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                self.text, self._stopped = self.text[:at], True
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def flush(self) -> str:
        self._advance(final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


# --- coordinator ---------------------------------------------------------------


@dataclass
class Peer:
    """A target or drafter with what it said about itself at start-up."""

    client: Target | Drafter
    address: str
    info: ServiceInfo


def _describe(kind: str, peer: Peer) -> str:
    m = peer.info.model
    return f"{kind} {peer.address} (model {m.model_id}, vocab {m.vocab_size}, tokenizer {m.tokenizer_fingerprint[:12]})"


def check_compatible(reference: Peer, kind: str, peer: Peer) -> None:
    """Refuse a peer that does not share the reference target's vocabulary.
    A drafter that reports ``vocab_size = 0`` works on any vocabulary (prompt
    lookup copies token ids without knowing what they mean)."""
    a, b = reference.info.model, peer.info.model
    if kind == DRAFTER and b.vocab_size == 0:
        return
    if (a.vocab_size, a.tokenizer_fingerprint) != (b.vocab_size, b.tokenizer_fingerprint):
        raise InvalidArgument(
            f"vocabulary mismatch: {_describe(kind, peer)} does not match {_describe('target', reference)}"
        )


async def fetch_info(client: Target | Drafter, timeout: float) -> ServiceInfo:
    """Ask a peer for its Info, retrying until it answers or ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.05
    while True:
        try:
            return await client.info()
        except Unavailable as exc:
            if loop.time() + delay > deadline:
                # The last error says why (a refused connection, a failed TLS handshake ...).
                raise Unavailable(f"{client.name} is unavailable: no answer within {timeout:g}s ({exc})") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


TARGET, DRAFTER = "target", "drafter"

#: Seeds drawn for requests without one stay below 2^53: exact as JSON numbers
#: and in JavaScript, whatever client reads them back.
SEED_BITS = 53


def new_seed() -> int:
    return secrets.randbits(SEED_BITS)


class Coordinator:
    """Targets, drafters, the engine over them, and the text layer.

    Membership can change while generations run (see
    :mod:`services.coordinator.discovery`): :meth:`add_peer` checks a new
    instance and puts it to work, :meth:`remove_peer` drains one."""

    def __init__(
        self,
        targets: Sequence[Peer],
        drafters: Sequence[Peer] = (),
        codec: Codec | None = None,
        defaults: Defaults | None = None,
    ) -> None:
        if not targets:
            raise InvalidArgument("at least one target is needed")
        self.codec = codec or Codec()
        self.defaults = defaults or Defaults()
        self.reference = targets[0]
        ref = self.reference.info.model
        self.engine = Engine(
            [],
            [],
            eos_token_ids=ref.eos_token_ids,
            max_context=ref.max_context_tokens,
            vocab_size=ref.vocab_size,
            max_sp_degree=self.defaults.max_sp_degree,
            verify_timeout=self.defaults.verify_timeout,
            draft_timeout=self.defaults.draft_timeout,
        )
        self._peers: dict[str, dict[int, Peer]] = {TARGET: {}, DRAFTER: {}}
        self._closing: set[asyncio.Future] = set()
        #: Generations running now, each with the future that cuts it short at shutdown;
        #: close() lets them release their sessions first.
        self._running: set[asyncio.Future[None]] = set()
        self._none_running = asyncio.Event()
        self._none_running.set()
        #: False once shutting down: new generations are refused (UNAVAILABLE)
        self.accepting = True
        self._auto_generations = DEFAULT_MAX_GENERATIONS
        self.watchers: list[Any] = []  # discovery watchers, see discovery.py
        #: Wraps every generation's output stream (metrics, see dsi/serving/metrics.py); None = as is.
        self.instrument: Callable[[GenerateInput, AsyncIterator[GenerateOutput]], AsyncIterator[GenerateOutput]] | None
        self.instrument = None
        #: Called for every generation before it starts: an engine observer to attach, or None. The tracing
        #: observer (services/coordinator/tracing.py) is one; one with a ``finished(generation, error)``
        #: method hears of the end too.
        self.observers: list[Callable[[Generation, GenerateInput], Observer | None]] = [tracing.observe]
        for kind, peers in ((TARGET, targets), (DRAFTER, drafters)):
            for p in peers:
                check_compatible(self.reference, kind, p)
                self._attach(kind, p)
        self._update_limits()
        self._update_sharing()
        if self.defaults.lookahead > self.engine.max_draft_tokens:
            raise InvalidArgument(
                f"default lookahead {self.defaults.lookahead} exceeds what the services accept"
                f" ({self.engine.max_draft_tokens})"
            )

    @classmethod
    async def connect(
        cls,
        targets: Sequence[tuple[str, Target]],
        drafters: Sequence[tuple[str, Drafter]],
        codec: Codec | None = None,
        defaults: Defaults | None = None,
        timeout: float = 60.0,
    ) -> Coordinator:
        infos = await asyncio.gather(*(fetch_info(c, timeout) for _, c in [*targets, *drafters]))
        peers = [Peer(c, a, i) for (a, c), i in zip([*targets, *drafters], infos, strict=True)]
        return cls(peers[: len(targets)], peers[len(targets) :], codec, defaults)

    # --- membership ---------------------------------------------------------------

    def pool(self, kind: str) -> Pool[Any]:
        return self.engine.targets if kind == TARGET else self.engine.drafters

    def peers(self, kind: str) -> dict[int, Peer]:
        """Active peers of a kind, by pool index."""
        return dict(self._peers[kind])

    @property
    def targets(self) -> list[Peer]:
        return list(self._peers[TARGET].values())

    @property
    def drafters(self) -> list[Peer]:
        return list(self._peers[DRAFTER].values())

    def _attach(self, kind: str, peer: Peer) -> int:
        index = self.pool(kind).add(peer.client, capacity=peer.info.limits.max_batch or 1)
        self._peers[kind][index] = peer
        if kind == DRAFTER:  # instances of one model are replicas; different models all draft every generation
            self.engine.drafter_models[index] = f"{peer.info.model.backend}:{peer.info.model.model_id}"
        return index

    def _update_limits(self) -> None:
        peers = self.targets + self.drafters
        self.engine.max_context = min(p.info.model.max_context_tokens for p in peers)
        limits = [p.info.limits.max_draft_tokens or 64 for p in self.targets]
        limits += [p.info.limits.max_lookahead or 64 for p in self.drafters]
        self.engine.max_draft_tokens = min(limits)
        # A generation may hold a session on every target replica, and on one drafter.
        target_sessions = [p.info.limits.max_sessions for p in self.targets if p.info.limits.max_sessions]
        drafter_sessions = [p.info.limits.max_sessions for p in self.drafters]
        caps = [min(target_sessions)] if target_sessions else [DEFAULT_MAX_GENERATIONS]
        if drafter_sessions and all(drafter_sessions):
            caps.append(sum(drafter_sessions))
        self._auto_generations = min(caps)

    def _update_sharing(self) -> None:
        """Whether the drafters compute on their targets' device: every peer a
        model (backend "hf") on one reported host and device, e.g. ``dsi up
        --demo`` on a CPU or a drafter and targets on one GPU. Drafting and
        verifying take turns there rather than overlap, so DSI's automatic
        lookahead is planned with SI's model (the model of separate devices
        chose 1-2 drafts on the demo pair, where 3-8 are faster)."""
        models = [p.info.model for p in self.targets + self.drafters]
        places = {(m.host, m.device) for m in models}
        shared = bool(self.drafters) and len(places) == 1 and all(m.host and m.backend == "hf" for m in models)
        if shared != self.engine.shared_device:
            log.info("drafters and targets %s one device", "share" if shared else "no longer share")
        self.engine.shared_device = shared

    @property
    def max_generations(self) -> int:
        """Generations at once: ``Defaults.max_generations``, or by default as
        many as every target replica (and the drafters together) has sessions
        for, so that a generation beyond that is refused at once rather than
        failing half-way when a replica runs out of sessions."""
        return self.defaults.max_generations or self._auto_generations

    @property
    def running(self) -> int:
        """Generations running now."""
        return len(self._running)

    async def add_peer(self, kind: str, address: str, client: Target | Drafter, timeout: float = 10.0) -> int:
        """Check a new instance (Info, vocabulary) and put it to work."""
        info = await fetch_info(client, timeout)
        peer = Peer(client, address, info)
        check_compatible(self.reference, kind, peer)
        index = self._attach(kind, peer)
        self._update_limits()
        self._update_sharing()
        log.info("%s added", kind, extra={"address": address, "replicas": len(self._peers[kind])})
        return index

    def remove_peer(self, kind: str, index: int) -> None:
        """Stop sending new work to an instance; close it once its running
        requests have finished."""
        peer = self._peers[kind].pop(index)

        def close() -> None:
            task = asyncio.ensure_future(peer.client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        self.pool(kind).drain(index, close)
        self._update_sharing()
        log.info("%s draining", kind, extra={"address": peer.address, "replicas": len(self._peers[kind])})

    async def shut_down(self, grace: float) -> None:
        """Stop taking generations (new ones get UNAVAILABLE), give running
        ones ``grace`` seconds to finish, then end the rest: each ends with a
        last message carrying ``FinishReason.CANCELLED`` and its stats."""
        self.accepting = False
        if not self._running:
            return
        log.info("waiting for %d generation(s) to finish", len(self._running), extra={"grace_seconds": grace})
        try:
            await asyncio.wait_for(self._none_running.wait(), grace)
        except asyncio.TimeoutError:
            log.info("ending %d generation(s) still running after the grace", len(self._running))
            for cut in self._running:
                if not cut.done():
                    cut.set_result(None)

    async def close(self) -> None:
        # Generations cut at the end of a shutdown's grace are cancelled just
        # before this runs: let them release their sessions on the targets and
        # drafters (bounded by the engine's release timeout) before the clients
        # close, or the sessions stay there until their idle timeout.
        try:
            await asyncio.wait_for(self._none_running.wait(), self.engine.release_timeout + 1.0)
        except asyncio.TimeoutError:
            log.warning("closing with %d generation(s) still releasing sessions", len(self._running))
        for w in self.watchers:
            await w.stop()
        await self.engine.close()
        clients = [s.member for pool in (self.engine.targets, self.engine.drafters) for s in pool.slots]
        await asyncio.gather(*(c.close() for c in clients), *self._closing, return_exceptions=True)

    def params(self, req: GenerateInput, prompt: Sequence[int]) -> GenerationParams:
        """The request's parameters with the server's defaults filled in."""
        d = self.defaults
        if req.auto_lookahead and req.lookahead:
            raise InvalidArgument(f"auto_lookahead asks for no fixed lookahead, got lookahead={req.lookahead}")
        max_new = req.max_new_tokens
        if not max_new:  # unset: the default, or as many as the context has room for
            room = self.engine.room(prompt)
            if room < 1:
                raise InvalidArgument(
                    f"the prompt of {len(prompt)} tokens leaves no room in the context limit of"
                    f" {self.engine.max_context} tokens"
                )
            max_new = min(d.max_new_tokens, room) if d.max_new_tokens else room
        return GenerationParams(
            max_new_tokens=max_new,
            sampling=SamplingParams.create(req.temperature, req.top_p, req.top_k),
            seed=new_seed() if req.seed is None else req.seed,
            strategy=req.strategy or d.strategy,
            lookahead=0 if req.auto_lookahead else req.lookahead or d.lookahead,
            tree=d.tree if req.tree is None else req.tree,
        )

    def generate(self, req: GenerateInput) -> AsyncIterator[GenerateOutput]:
        """Stream the generation; the last output carries finish_reason and stats."""
        stream = self._generate(req)
        return stream if self.instrument is None else self.instrument(req, stream)

    def _admit(self) -> asyncio.Future[None]:
        """Count a new generation in, or refuse it; returns the future that cuts it short."""
        if not self.accepting:
            raise Unavailable("the coordinator is shutting down; retry (on another replica of the service)")
        if len(self._running) >= self.max_generations:
            raise ResourceExhausted(
                f"the coordinator is running its limit of {self.max_generations} generations; retry later"
            )
        cut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running.add(cut)
        self._none_running.clear()
        return cut

    def _leave(self, cut: asyncio.Future[None]) -> None:
        self._running.discard(cut)
        if not self._running:
            self._none_running.set()

    def _prompt(self, req: GenerateInput) -> list[int]:
        if req.prompt:
            return self.codec.encode(req.prompt)
        n = len(req.prompt_token_ids)  # before copying: a huge prompt is refused without a copy
        if n > self.engine.max_context:
            raise InvalidArgument(
                f"the prompt of {n} tokens leaves no room in the context limit of {self.engine.max_context} tokens"
            )
        return list(req.prompt_token_ids)

    async def _generate(self, req: GenerateInput) -> AsyncIterator[GenerateOutput]:
        check_stops(req.stop)
        cut = self._admit()
        try:
            prompt = self._prompt(req)
            params = self.params(req, prompt)
            generation = self.engine.generate(prompt, params)
            if req.timeout is not None:
                generation.deadline = asyncio.get_running_loop().time() + req.timeout
        except BaseException:
            self._leave(cut)
            raise
        recorder = TimelineRecorder(params.strategy.value, len(prompt)) if req.timeline else None
        observers = [make(generation, req) for make in self.observers]
        generation.observer = combine([*observers, recorder])
        error: BaseException | None = None
        text = TextStream(self.codec.decode, req.stop)
        tokens = generation.tokens()
        nxt: asyncio.Future[list[int]] | None = None
        sent = 0
        final_ids: list[int] = []
        final_text = ""
        try:
            while True:
                # The next tokens, unless the shutdown cuts the generation short first.
                nxt = asyncio.ensure_future(tokens.__anext__())
                await asyncio.wait({nxt, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    generation.stop(FinishReason.CANCELLED)
                    final_text = text.flush()
                    break
                done, nxt = nxt, None
                try:
                    ids = done.result()
                except StopAsyncIteration:
                    final_text = text.flush()
                    break
                finally:
                    del done  # an error raised here must not keep its task, and so itself, in a cycle
                if not text.stops:
                    delta, stopped = text.push(ids)
                else:  # token by token, to end exactly at the token that completes a stop string
                    delta, stopped, used = "", False, 0
                    for tok in ids:
                        piece, stopped = text.push([tok])
                        delta, used = delta + piece, used + 1
                        if stopped:
                            break
                    ids = ids[:used]
                if stopped:
                    generation.stop(FinishReason.STOP)
                    final_ids, final_text = ids, delta
                    break
                sent += len(ids)
                yield GenerateOutput(ids, delta)
        except Unavailable as exc:
            error = exc
            for watcher in self.watchers:  # a replica may be gone: look again now
                watcher.poke()
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                if nxt is not None:  # still waiting for tokens: stop that first (it cancels the generation's RPCs)
                    nxt.cancel()
                    await asyncio.wait({nxt})
                    if not nxt.cancelled():
                        nxt.exception()  # retrieved: the generation ends here anyway
                await tokens.aclose()  # type: ignore[attr-defined]
            finally:
                self._leave(cut)
                for o in observers:
                    if o is not None and hasattr(o, "finished"):
                        o.finished(generation, error)
        stats = generation.stats
        stats.new_tokens = sent + len(final_ids)  # tokens after a stop string are not returned
        timeline = recorder.finish() if recorder is not None else None
        yield GenerateOutput(final_ids, final_text, generation.finish_reason, stats, timeline)
