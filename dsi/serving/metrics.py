"""Prometheus metrics of the three services (``--metrics-port``).

Every service process keeps its metrics in its own
:class:`prometheus_client.CollectorRegistry` (never the library's global one),
so several services in one process, as in the tests, stay apart.

* Targets and drafters (:class:`ServiceMetrics`): the :class:`ServiceCounters`
  that ``Info`` reports, read at scrape time, plus histograms of every forward
  pass (tokens computed = batch size, seconds) through the backends'
  ``on_forward`` hook.
* The coordinator (:class:`CoordinatorMetrics`): per-generation counters and
  histograms recorded from each generation's final
  :class:`~services.coordinator.engine.GenerationStats` through the
  coordinator's ``instrument`` hook (so gRPC and HTTP requests count alike),
  and the replica pool's load read at scrape time.

docs/api.md lists every metric.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from dsi.domain import errors
from dsi.serving.web import HttpServer, start_http
from dsi.wire.security import ServerSecurity

if TYPE_CHECKING:
    from dsi.backends.base import Forward, LocalDrafter, LocalTarget
    from services.coordinator.coordinator import Coordinator, GenerateInput, GenerateOutput

#: Tokens computed by one forward pass: 1 (a decoding step) up to a long prefill.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
#: Seconds, from a fast drafter step to a slow prefill or a whole generation.
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
RATE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

#: Outcome label of a generation that ended with an error, by domain error.
ERROR_OUTCOMES: list[tuple[type[errors.DsiError], str]] = [
    (errors.InvalidArgument, "invalid_argument"),
    (errors.NotFound, "not_found"),
    (errors.ResourceExhausted, "resource_exhausted"),
    (errors.Unavailable, "unavailable"),
    (errors.Cancelled, "cancelled"),
]


def add_metrics_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = any free port; default: off)",
    )


# --- targets and drafters -------------------------------------------------------------


class _CountersCollector:
    """ServiceCounters and sessions of a LocalTarget/LocalDrafter, read at scrape time."""

    def __init__(self, role: str, backend: LocalTarget | LocalDrafter) -> None:
        self.role = role
        self.backend = backend

    def collect(self) -> Iterable[Metric]:
        b, p = self.backend, f"dsi_{self.role}"
        c = b.counters
        counters = [
            ("forward_passes", "Model forward passes run.", c.forward_passes),
            ("computed_tokens", "Tokens whose keys and values a forward pass computed.", c.computed_tokens),
            (
                "cached_tokens",
                "Tokens whose keys and values were reused from a session's cache (cache hits).",
                c.cached_tokens,
            ),
            (
                "requests",
                "Verify requests answered." if self.role == "target" else "Draft streams finished.",
                c.requests,
            ),
            ("cancelled_requests", "Requests cancelled by their client before they finished.", c.cancelled_requests),
            ("evicted_sessions", "Sessions dropped for idleness or to make room.", b.sessions.evicted),
        ]
        if self.role == "drafter":
            counters.append(("drafted_tokens", "Tokens drafted.", c.drafted_tokens))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{p}_{name}", doc, value=value)
        yield GaugeMetricFamily(f"{p}_sessions", "Sessions held now.", value=len(b.sessions))
        yield GaugeMetricFamily(f"{p}_busy_sessions", "Sessions with a request running or queued now.", b.sessions.busy)
        if self.role == "drafter":
            yield GaugeMetricFamily(f"{p}_active_streams", "Draft streams running now.", b.active_streams)  # type: ignore[union-attr]
        m = b.model.info
        info = InfoMetricFamily(f"{p}_model", "The model this instance serves.")
        info.add_metric(
            [],
            {
                "model_id": m.model_id,
                "backend": m.backend,
                "device": m.device,
                "dtype": m.dtype,
                "vocab_size": str(m.vocab_size),
            },
        )
        yield info


class ServiceMetrics:
    """Metrics of a target (``role="target"``) or drafter instance."""

    def __init__(self, role: str, backend: LocalTarget | LocalDrafter) -> None:
        if role not in ("target", "drafter"):
            raise ValueError(role)
        self.registry = CollectorRegistry()
        self.forward_tokens = Histogram(
            f"dsi_{role}_forward_tokens",
            "Tokens computed by one forward pass (the batch size of the pass).",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.forward_cached_tokens = Histogram(
            f"dsi_{role}_forward_cached_tokens",
            "Tokens one forward pass reused from the session's cache.",
            buckets=(0, *TOKEN_BUCKETS),
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            f"dsi_{role}_forward_seconds",
            "Seconds of model work of one forward pass.",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_CountersCollector(role, backend))
        backend.on_forward = self.observe_forward

    def observe_forward(self, fwd: Forward) -> None:
        self.forward_tokens.observe(fwd.computed_tokens)
        self.forward_cached_tokens.observe(fwd.cached_tokens)
        self.forward_seconds.observe(fwd.seconds)


# --- coordinator ------------------------------------------------------------------------


class _PoolCollector:
    """Replica load of a coordinator, read at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterable[Metric]:
        from services.coordinator.coordinator import DRAFTER, TARGET

        c = self.coordinator
        load = GaugeMetricFamily(
            "dsi_replica_in_flight",
            "Requests in flight from this coordinator to each target replica (Verify) and drafter (Draft streams).",
            labels=["kind", "address"],
        )
        replicas = GaugeMetricFamily("dsi_replicas", "Active replicas, by kind.", labels=["kind"])
        available = GaugeMetricFamily(
            "dsi_replica_available",
            "1 while a replica is in service; 0 after a call to it failed, until its health check answers.",
            labels=["kind", "address"],
        )
        total = 0
        for kind, pool in ((TARGET, c.engine.targets), (DRAFTER, c.engine.drafters)):
            peers = c.peers(kind)
            for i, peer in peers.items():
                n = pool.in_flight(i)
                load.add_metric([kind, peer.address], n)
                available.add_metric([kind, peer.address], 0.0 if pool.slots[i].down else 1.0)
                if kind == TARGET:
                    total += n
            replicas.add_metric([kind], len(peers))
        yield load
        yield replicas
        yield available
        # Draining replicas may still run verifications: count every slot.
        in_flight = sum(c.engine.targets.in_flight(i) for i in range(len(c.engine.targets.slots)))
        yield GaugeMetricFamily(
            "dsi_verifications_in_flight", "Verify requests in flight on all target replicas.", value=in_flight
        )


class CoordinatorMetrics:
    """Metrics of a coordinator; installs itself as ``coordinator.instrument``."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        r = self.registry = CollectorRegistry()
        s = ["strategy"]
        self.requests = Counter(
            "dsi_requests",
            "Generations ended, by strategy and outcome: the finish reason (length, eos, stop, cancelled),"
            " disconnected (the client went away), or the error (invalid_argument, unavailable, ...).",
            ["strategy", "outcome"],
            registry=r,
        )
        self.in_progress = Gauge("dsi_requests_in_progress", "Generations running now.", s, registry=r)
        self.tokens = Counter("dsi_generated_tokens", "Tokens generated and returned to clients.", s, registry=r)
        self.ttft = Histogram(
            "dsi_time_to_first_token_seconds",
            "Seconds from the start of a generation to its first token.",
            s,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "dsi_time_per_output_token_seconds",
            "Per generation of 2 tokens or more: seconds per token after the first, (wall - TTFT) / (tokens - 1).",
            s,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "dsi_generation_seconds", "Wall-clock seconds of a generation.", s, buckets=SECONDS_BUCKETS, registry=r
        )
        self.acceptance = Histogram(
            "dsi_acceptance_rate",
            "Per generation that decided drafts: accepted / decided draft tokens.",
            s,
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.drafted = Counter("dsi_drafted_tokens", "Tokens received from drafters.", s, registry=r)
        self.decided = Counter(
            "dsi_decided_draft_tokens",
            "Drafted tokens whose position was decided while they were the draft there"
            " (the acceptance rate is accepted / decided).",
            s,
            registry=r,
        )
        self.accepted = Counter(
            "dsi_accepted_tokens", "Drafted tokens the target accepted and that were committed.", s, registry=r
        )
        self.forward_passes = Counter(
            "dsi_target_forward_passes", "Target forward passes that finished, used or not.", s, registry=r
        )
        self.verifications = Counter("dsi_verifications_started", "Verify requests sent.", s, registry=r)
        self.cancelled = Counter(
            "dsi_verifications_cancelled",
            "Verify requests cancelled as stale (they assumed a rejected token) or useless"
            " (every position they cover was decided by another).",
            s,
            registry=r,
        )
        self.preemptions = Counter(
            "dsi_preemptions",
            "Speculative Verify requests cancelled to free a replica for a frontier step.",
            s,
            registry=r,
        )
        self.draft_streams = Counter("dsi_draft_streams", "Draft streams opened.", s, registry=r)
        self.alternative_hits = Counter(
            "dsi_alternative_hits", "Committed tokens that were a token tree's alternative.", s, registry=r
        )
        self.failovers = Counter(
            "dsi_failovers",
            "Verify requests issued again on another target replica after theirs failed (no token changes).",
            s,
            registry=r,
        )
        self.drafter_failures = Counter(
            "dsi_drafter_failures",
            "Draft streams that failed; the generation went on without that drafter.",
            s,
            registry=r,
        )
        self.tokens_without_drafter = Counter(
            "dsi_tokens_without_drafter", "Tokens generated while no drafter was in service.", s, registry=r
        )
        d = ["strategy", "drafter"]
        self.drafter_decided = Counter(
            "dsi_drafter_decided_tokens", "Per drafter: its guesses whose position was decided.", d, registry=r
        )
        self.drafter_accepted = Counter(
            "dsi_drafter_accepted_tokens", "Per drafter: its guesses that were committed.", d, registry=r
        )
        self.drafter_unique = Counter(
            "dsi_drafter_unique_tokens",
            "Per drafter: committed guesses of it where the main path guessed otherwise (what only it contributed).",
            d,
            registry=r,
        )
        self.drafter_dropped = Counter(
            "dsi_drafter_dropped", "Per drafter: generations that dropped it for contributing nothing.", d, registry=r
        )
        r.register(_PoolCollector(coordinator))
        coordinator.instrument = self.instrument

    def instrument(self, req: GenerateInput, stream: AsyncIterator[GenerateOutput]) -> AsyncIterator[GenerateOutput]:
        return self._observe(req, stream)

    async def _observe(
        self, req: GenerateInput, stream: AsyncIterator[GenerateOutput]
    ) -> AsyncIterator[GenerateOutput]:
        strategy = (req.strategy or self.coordinator.defaults.strategy).value
        in_progress = self.in_progress.labels(strategy)
        in_progress.inc()
        outcome = "internal"
        streamed = 0
        final: GenerateOutput | None = None
        try:
            async for out in stream:
                streamed += len(out.token_ids)
                if out.finish_reason is not None:
                    final = out
                    outcome = out.finish_reason.value
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            if final is None:
                outcome = "disconnected"
            raise
        except errors.DsiError as exc:
            outcome = next((name for cls, name in ERROR_OUTCOMES if isinstance(exc, cls)), "internal")
            raise
        finally:
            try:
                await stream.aclose()  # type: ignore[attr-defined]
            finally:
                in_progress.dec()
                self.requests.labels(strategy, outcome).inc()
                self._record(strategy, req, final, streamed)

    def _record(self, strategy: str, req: GenerateInput, final: GenerateOutput | None, streamed: int) -> None:
        st = final.stats if final is not None else None
        if st is None:  # ended early: only what reached the client is known
            self.tokens.labels(strategy).inc(streamed)
            return
        self.tokens.labels(strategy).inc(st.new_tokens)
        self.duration.labels(strategy).observe(st.wall_seconds)
        if st.new_tokens >= 1:
            self.ttft.labels(strategy).observe(st.time_to_first_token_seconds)
        if st.new_tokens >= 2:
            tpot = (st.wall_seconds - st.time_to_first_token_seconds) / (st.new_tokens - 1)
            self.tpot.labels(strategy).observe(max(tpot, 0.0))
        if st.decided_drafts:
            self.acceptance.labels(strategy).observe(st.acceptance_rate)
        for metric, value in (
            (self.drafted, st.drafted_tokens),
            (self.decided, st.decided_drafts),
            (self.accepted, st.accepted_tokens),
            (self.forward_passes, st.target_forward_passes),
            (self.verifications, st.verifications_started),
            (self.cancelled, st.verifications_cancelled),
            (self.preemptions, st.preemptions),
            (self.draft_streams, st.draft_streams),
            (self.alternative_hits, st.alternative_hits),
            (self.failovers, st.failovers),
            (self.drafter_failures, st.drafter_failures),
            (self.tokens_without_drafter, st.tokens_without_drafter),
        ):
            metric.labels(strategy).inc(value)
        for ds in st.drafters:
            self.drafter_decided.labels(strategy, ds.drafter).inc(ds.decided)
            self.drafter_accepted.labels(strategy, ds.drafter).inc(ds.accepted)
            self.drafter_unique.labels(strategy, ds.drafter).inc(ds.unique)
            if ds.dropped:
                self.drafter_dropped.labels(strategy, ds.drafter).inc()


# --- exposition -------------------------------------------------------------------------


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """An aiohttp app serving ``registry`` at ``/metrics`` (text format, or
    OpenMetrics when the scraper asks for it)."""

    async def handle(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, grace: float = 1.0, security: ServerSecurity | None = None
) -> HttpServer:
    return await start_http(metrics_app(registry), host, port, grace, security)


def parse_text(text: str) -> dict[str, Any]:
    """Samples of a text exposition as {name{labels}: value} (for tests and tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def serve_service_metrics(
    role: str, backend: LocalTarget | LocalDrafter, host: str, port: int | None, security: ServerSecurity | None = None
) -> HttpServer | None:
    """Metrics of a target or drafter on ``host:port``; None when ``port`` is None (off)."""
    if port is None:
        return None
    server = await serve_metrics(ServiceMetrics(role, backend).registry, host, port, security=security)
    logging.getLogger(f"dsi.{role}").info("metrics serving", extra={"url": f"{server.url}/metrics"})
    return server
