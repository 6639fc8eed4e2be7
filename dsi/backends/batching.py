"""Continuous batching on one device.

A :class:`DeviceQueue` stands for one device (a GPU, or a CPU's worth of
cores). Forward passes run one at a time. Chain requests (``forward``: a
context and zero or more draft tokens, possibly of different sessions with
different cached lengths) that are waiting when a pass starts run *together*
in that pass, bounded by ``max_batch`` requests and ``max_batch_tokens``
tokens to compute; the others wait for the next pass. A request that arrives
while a pass runs joins the next one (continuous batching). Work that cannot
share a pass (a token tree, which must also prune its session's cache before
the device moves on) runs alone (``exclusive``), in arrival order.

A request cancelled while it waits is removed from the queue and never runs.
A request cancelled while its pass runs still waits for that pass to end
(the pass finishes for the others, and the device writes the request's
session state until then), then raises ``CancelledError``: so the session it
holds is never released, evicted or handed to its next request while the
device uses it.

``max_batch = 1`` is the old behaviour: one request per pass, in arrival order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
R = TypeVar("R")

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class BatchLimits:
    """How much one pass may take: requests, and tokens to compute (a
    request over the token limit on its own still runs, alone)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_batch and max_batch_tokens must be >= 1")


@dataclass(frozen=True)
class BatchItem:
    """One target request of a batched pass: a session's state, its full
    token sequence, and how many rows (positions at the end) it wants."""

    state: Any
    tokens: Sequence[int]
    num_rows: int


@dataclass(eq=False)
class _Job:
    future: asyncio.Future[Any]
    item: Any = None  # None: exclusive work
    work: Callable[[], Awaitable[Any]] | None = None
    tokens: int = 0  # tokens this request computes (its share of max_batch_tokens)
    started: float | None = None  # when its pass began (the event loop's clock); None: not yet


@dataclass
class QueueStats:
    """What the queue did since start (the Info counters and the tests read it)."""

    passes: int = 0
    requests: int = 0
    batched_requests: int = 0  # requests that shared their pass with others
    largest_batch: int = 0
    skipped_cancelled: int = 0  # requests cancelled while waiting, never run


@dataclass
class DeviceQueue(Generic[Item, R]):
    """One device's queue. ``run_batch`` runs one pass over a list of
    batchable items and returns one result per item, in order."""

    run_batch: Callable[[list[Item]], Awaitable[Sequence[R]]]
    limits: BatchLimits = field(default_factory=BatchLimits)
    stats: QueueStats = field(default_factory=QueueStats)
    _queue: deque[_Job] = field(default_factory=deque)
    _pump: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return sum(1 for j in self._queue if not j.future.done())

    async def batched(self, item: Item, tokens: int) -> tuple[R, float]:
        """Run ``item`` in the next pass that has room for it; returns its
        result and the time its pass started (the event loop's clock:
        virtual in ``dsi simulate --engine``)."""
        job = _Job(asyncio.get_running_loop().create_future(), item=item, tokens=max(1, tokens))
        return await self._submit(job)

    async def exclusive(self, work: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
        """Run ``work`` alone on the device, in arrival order."""
        job = _Job(asyncio.get_running_loop().create_future(), work=work)
        return await self._submit(job)

    async def _submit(self, job: _Job) -> tuple[Any, float]:
        self._queue.append(job)
        loop = asyncio.get_running_loop()
        if self._pump is None or self._pump.done() or self._pump.get_loop() is not loop:  # (a test's new loop)
            self._queue = deque(j for j in self._queue if j.future.get_loop() is loop)
            self._pump = loop.create_task(self._run())
        try:
            result = await asyncio.shield(job.future)  # a cancellation reaches this wait, not the job
        except asyncio.CancelledError:
            if job.started is None:  # never ran: make sure no pass takes it
                job.future.cancel()
            elif not job.future.done():
                await self._outlive(job)
            raise
        assert job.started is not None  # a result comes from a pass
        return result, job.started

    @staticmethod
    async def _outlive(job: _Job) -> None:
        """A request cancelled while its pass runs waits for that pass to end
        (one pass at most) before it gives up its session: the device is
        still reading and writing the session's state, and whoever holds the
        session next (a later request, or a release that frees the state)
        must find it whole. A second cancellation stops the wait."""
        await asyncio.wait([job.future])
        if not job.future.cancelled():
            job.future.exception()  # retrieved: the caller is gone, its pass's error goes nowhere

    def _next(self) -> list[_Job]:
        """The jobs of the next pass: the first exclusive job if it heads the
        queue, else waiting chain requests in arrival order within the limits."""
        while self._queue and self._queue[0].future.done():  # cancelled while waiting
            self._queue.popleft()
            self.stats.skipped_cancelled += 1
        if not self._queue:
            return []
        if self._queue[0].item is None:
            return [self._queue.popleft()]
        batch: list[_Job] = []
        tokens = 0
        kept: deque[_Job] = deque()
        for job in self._queue:
            if job.future.done():
                self.stats.skipped_cancelled += 1
                continue
            room = not batch or tokens + job.tokens <= self.limits.max_batch_tokens
            fits = len(batch) < self.limits.max_batch and room
            if job.item is not None and fits:
                batch.append(job)
                tokens += job.tokens
            else:
                kept.append(job)
        self._queue = kept
        return batch

    async def _run(self) -> None:
        await asyncio.sleep(0)  # requests submitted in the same event-loop turn share the first pass
        while True:
            jobs = self._next()
            if not jobs:
                return
            start = asyncio.get_running_loop().time()
            for job in jobs:
                job.started = start
            self.stats.passes += 1
            self.stats.requests += len(jobs)
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            if len(jobs) > 1:
                self.stats.batched_requests += len(jobs)
            try:
                if jobs[0].work is not None:
                    results: list[Any] = [await jobs[0].work()]
                else:
                    results = list(await self.run_batch([j.item for j in jobs]))
            except Exception as exc:  # every request of the pass fails with it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            except BaseException:  # the queue itself is cancelled (shutdown): nobody waits forever
                for job in [*jobs, *self._queue]:
                    job.future.cancel()
                raise
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
