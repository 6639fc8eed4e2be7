"""Services as separate ``python -m dsi`` processes on loopback, for the
experiments that watch or disturb them from outside (memory, fault soak):
start one (optionally on a given port, to restart it at the same address),
read its resident memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


@dataclass
class Service:
    name: str
    popen: subprocess.Popen
    log: Path
    address: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB (Linux: /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def spawn(
    workdir: Path, name: str, argv: list[str], port: int = 0, source: Path | None = None, timeout: float = 60.0
) -> Service:
    """``python -m dsi ARGV`` listening on ``LOOPBACK:port`` (0: any free port),
    once it announces its address; ``source``: another checkout to run it from."""
    log, announce = workdir / f"{name}.log", workdir / f"{name}.addr"
    announce.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dsi", *argv, "--host", LOOPBACK, "--port", str(port), "--announce", str(announce)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    with open(log, "ab") as fh:
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=source
        )
    svc = Service(name, popen, log)
    deadline = time.monotonic() + timeout
    while not announce.exists() or not announce.read_text().strip():
        if popen.poll() is not None or time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    svc.address = announce.read_text().strip()
    return svc
