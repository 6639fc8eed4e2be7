"""Real ``python -m dsi`` processes on loopback for the tests that stop,
kill or restart them (tests/test_shutdown.py, tests/test_faults.py): spawn
them, wait for their announced address, stream a Generate. Every process
listens on 127.0.0.1 only, every wait is bounded, and every process is killed
when its ExitStack closes."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dsi.v1 import generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0

# 20 ms per target forward pass; a 2 ms drafter whose tokens are accepted 70% of the time.
TARGET = "synthetic:vocab=1000,seed=3,tpot_ms=20"
DRAFTER = "synthetic:vocab=1000,seed=3,tpot_ms=2,acceptance=0.7"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    announce: Path
    address: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def messages(self) -> list[str]:
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line)["msg"])
            except (ValueError, KeyError, TypeError):
                out.append(line)
        return out

    def sigterm(self) -> float:
        """Send SIGTERM; returns when (time.monotonic())."""
        self.popen.send_signal(signal.SIGTERM)
        return time.monotonic()


def spawn(stack: ExitStack, tmp: Path, name: str, *args: str, port: int = 0) -> Proc:
    """``python -m dsi ARGS`` on loopback (``port`` 0: a free one); killed when ``stack`` closes."""
    log, announce = tmp / f"{name}.log", tmp / f"{name}.addr"
    announce.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "dsi", *args, "--host", LOOPBACK, "--port", str(port), "--announce", str(announce)]
    with open(log, "ab") as fh:
        popen = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)

    def kill() -> None:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)

    stack.callback(kill)
    return Proc(name, popen, log, announce)


def wait_announced(*procs: Proc, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        while not p.announce.exists():
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.popen.returncode}:\n{p.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{p.name} did not start within {timeout}s:\n{p.text()[-2000:]}")
            time.sleep(0.05)
        p.address = p.announce.read_text().strip()
        assert p.address.startswith(f"{LOOPBACK}:"), p.address


@dataclass
class Cluster:
    targets: list[Proc]
    drafter: Proc
    coordinator: Proc


def start_cluster(
    stack: ExitStack,
    tmp: Path,
    targets: int = 2,
    coordinator: tuple[str, ...] = (),
    target: tuple[str, ...] = (),
    models: tuple[str, str] = (TARGET, DRAFTER),
) -> Cluster:
    """Target replicas, a drafter (``models``: their specs) and a coordinator in front of them."""
    ts = [spawn(stack, tmp, f"target-{i}", "target", "--model", models[0], *target) for i in range(targets)]
    d = spawn(stack, tmp, "drafter", "drafter", "--model", models[1])
    wait_announced(*ts, d)
    argv = ["coordinator", "--drafter", d.address, "--connect-timeout", "30", *coordinator]
    for t in ts:
        argv += ["--target", t.address]
    c = spawn(stack, tmp, "coordinator", *argv)
    wait_announced(c)
    return Cluster(ts, d, c)


async def wait_exit(p: Proc, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while p.popen.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{p.name} still running {timeout}s after SIGTERM:\n{p.text()[-2000:]}")
        await asyncio.sleep(0.02)
    return p.popen.returncode


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Until ``predicate()`` (or, for a coroutine function, its awaited result) is true; bounded."""
    deadline = time.monotonic() + timeout
    while not ((await value) if inspect.isawaitable(value := predicate()) else value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Streamed:
    """A Generate stream: tokens with arrival times, and how it ended."""

    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    finish_reason: int = 0
    stats: generation_pb2.GenerationStats | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    ended: float = 0.0
    task: asyncio.Task | None = None


def request(tokens: int, lookahead: int = 3) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt_token_ids=[1, 2, 3, 4], max_new_tokens=tokens, strategy=generation_pb2.STRATEGY_DSI, lookahead=lookahead
    )


def generate(channel: grpc.aio.Channel, req: generation_pb2.GenerateRequest) -> Streamed:
    out = Streamed()

    async def run() -> None:
        call = generation_pb2_grpc.GenerationServiceStub(channel).Generate(req, timeout=60)
        try:
            async for msg in call:
                out.tokens += msg.token_ids
                out.arrivals.append(time.monotonic())
                if msg.finish_reason:
                    out.finish_reason, out.stats = msg.finish_reason, msg.stats
            out.code = await call.code()
        except grpc.aio.AioRpcError as exc:
            out.code, out.details = exc.code(), exc.details() or ""
        out.ended = time.monotonic()

    out.task = asyncio.ensure_future(run())
    return out


async def finished(x: Any, timeout: float) -> None:
    """Wait for a stream (anything with its ``task``) to end."""
    assert x.task is not None
    await asyncio.wait_for(x.task, timeout)
