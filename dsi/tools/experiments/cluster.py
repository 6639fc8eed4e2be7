"""Start the services an experiment's cluster describes.

Two ways, the same services and the same gRPC hops either way:

* ``subprocess`` (the default of ``dsi bench``): every target and drafter is its
  own ``dsi target`` / ``dsi drafter`` process, as ``dsi up`` and a deployment
  run them, and the coordinator its own process
  (:mod:`dsi.tools.experiments.coordinator`: the stock coordinator whose client
  channels carry the injected link delays). Each service has its own event
  loop and Python interpreter, so their overheads do not add up in one loop.
  A prompt-lookup drafter (``ngram:...``) runs inside the coordinator
  (``--drafter ngram:...``), its cheap deployment.
* ``inproc``: every server in the benchmark's own event loop (fast start-up:
  tests and quick checks). All RPC handling then shares one interpreter, so the
  measured overhead is larger than a deployment's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsi.backends.ngram import is_ngram
from dsi.domain.errors import Unavailable
from dsi.tools.experiments import netdelay
from dsi.tools.experiments.config import Cluster

LAUNCHES = ("subprocess", "inproc")


@dataclass
class Running:
    address: str  # the coordinator
    cluster: Cluster
    launch: str
    stack: AsyncExitStack
    log_dir: Path | None = None
    local_targets: list[Any] = field(default_factory=list)  # inproc: the backends (their counters)
    local_drafters: list[Any] = field(default_factory=list)
    #: subprocess: each service's process id and address, by name (target-0, drafter-0, coordinator)
    pids: dict[str, int] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    async def close(self) -> None:
        await self.stack.aclose()


@dataclass
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    announce: Path
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _spawn(log_dir: Path, name: str, module: str, argv: list[str]) -> _Child:
    announce = log_dir / f"{name}.addr"
    log = log_dir / f"{name}.log"
    with contextlib.suppress(FileNotFoundError):
        announce.unlink()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # many small processes on few cores: no thread oversubscription
    with open(log, "wb") as fh:  # noqa: ASYNC230 - a local file, once per child
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *argv,
            "--announce",
            str(announce),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fh,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return _Child(name, proc, announce, log)


async def _address(child: _Child, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not child.announce.exists() or not child.announce.read_text().strip():
        if child.proc.returncode is not None:
            raise Unavailable(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise Unavailable(f"{child.name} did not start within {timeout:g}s:\n{child.tail()}")
        await asyncio.sleep(0.05)
    return child.announce.read_text().strip()


async def _stop(children: list[_Child], grace: float = 5.0) -> None:
    for child in reversed(children):  # the coordinator first
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()


async def start(
    cluster: Cluster,
    launch: str = "subprocess",
    log_dir: Path | None = None,
    startup_timeout: float = 300.0,
    log_level: str = "warning",
    coordinator_args: Sequence[str] = (),
) -> Running:
    """``coordinator_args``: more command-line arguments of the coordinator
    process (``subprocess`` only), e.g. ``--no-verify-stream``."""
    if launch == "inproc":
        return await _start_inproc(cluster)
    if launch != "subprocess":
        raise ValueError(f"unknown launch {launch!r}; use {' or '.join(LAUNCHES)}")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="dsi-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = AsyncExitStack()
    children: list[_Child] = []
    stack.push_async_callback(_stop, children)
    try:
        common = ["--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--log-level", log_level]
        for i, t in enumerate(cluster.targets):
            argv = ["target", "--model", t.model, "--device", t.device, "--dtype", t.dtype, *common]
            children.append(await _spawn(log_dir, f"target-{i}", "dsi", argv))
        for i, d in enumerate(cluster.drafters):
            if is_ngram(d.model):
                continue  # prompt lookup runs inside the coordinator
            argv = ["drafter", "--model", d.model, "--device", d.device, "--dtype", d.dtype, *common]
            children.append(await _spawn(log_dir, f"drafter-{i}", "dsi", argv))
        addrs = [await _address(c, startup_timeout) for c in children]
        argv = [*common, "--max-sp-degree", str(cluster.max_sp_degree), *coordinator_args]
        for inst, addr in zip(cluster.targets, addrs, strict=False):
            argv += ["--target", addr, "--target-delay-ms", f"{inst.delay_ms:g}"]
        served = iter(addrs[len(cluster.targets) :])
        for inst in cluster.drafters:
            addr = inst.model if is_ngram(inst.model) else next(served)
            argv += ["--drafter", addr, "--drafter-delay-ms", f"{inst.delay_ms:g}"]
        coordinator = await _spawn(log_dir, "coordinator", "dsi.tools.experiments.coordinator", argv)
        children.append(coordinator)
        address = await _address(coordinator, startup_timeout)
    except BaseException:
        await stack.aclose()
        raise
    named = {c.name: a for c, a in zip(children, [*addrs, address], strict=True)}
    pids = {c.name: c.proc.pid for c in children}
    return Running(address, cluster, "subprocess", stack, log_dir, pids=pids, addresses=named)


async def _start_inproc(cluster: Cluster) -> Running:
    from dsi.backends import LocalTarget, load_drafter, load_target_model
    from dsi.serving.server import start_server
    from dsi.wire.transport import GrpcDrafter, GrpcTarget
    from services.coordinator.coordinator import Codec, Coordinator, Defaults
    from services.coordinator.service import register as register_coordinator
    from services.drafter.service import register as register_drafter
    from services.target.service import register as register_target

    stack = AsyncExitStack()
    try:
        local_t = [LocalTarget(load_target_model(t.model, t.device, t.dtype)) for t in cluster.targets]
        local_d = [load_drafter(d.model, d.device, d.dtype) for d in cluster.drafters]
        t_clients, d_clients = [], []
        for inst, lt in zip(cluster.targets, local_t, strict=True):
            srv = await start_server(register_target(lt))
            stack.push_async_callback(srv.stop, 0)
            t_clients.append((srv.address, GrpcTarget(srv.address, interceptors=netdelay.interceptors(inst.delay_ms))))
        for inst, ld in zip(cluster.drafters, local_d, strict=True):
            srv = await start_server(register_drafter(ld))
            stack.push_async_callback(srv.stop, 0)
            d_clients.append((srv.address, GrpcDrafter(srv.address, interceptors=netdelay.interceptors(inst.delay_ms))))
        coordinator = await Coordinator.connect(
            t_clients, d_clients, Codec(), Defaults(max_sp_degree=cluster.max_sp_degree), timeout=30.0
        )
        stack.push_async_callback(coordinator.close)
        srv = await start_server(register_coordinator(coordinator))
        stack.push_async_callback(srv.stop, 0)
    except BaseException:
        await stack.aclose()
        raise
    return Running(srv.address, cluster, "inproc", stack, None, local_t, local_d)
