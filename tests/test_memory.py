"""No request of any shape takes a service above twice its idle memory plus
the request's own size, and none leaves memory held after it is refused
(issue 16: one 60 MB request used to take the coordinator from 70 MB to
1.7 GB of RSS, held while idle).

Real processes (a synthetic target, drafter and coordinator with the HTTP
API, on 127.0.0.1), the request shapes of ``dsi.tools.experiments.memory``
(whose 60 MB run is in docs/benchmarks.md), here with 8 MB for the huge ones:
32 times the default size limit. Peak RSS is the kernel's high-water mark
(``VmHWM``, reset before each request), so no spike is missed between samples.
Linux only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dsi.tools.experiments import memory

pytestmark = pytest.mark.skipif(
    not os.path.exists(f"/proc/{os.getpid()}/clear_refs"), reason="needs Linux /proc (VmHWM, clear_refs)"
)

BIG = 8_000_000


def test_every_request_shape_stays_within_twice_idle_plus_its_size_and_is_not_held():
    with tempfile.TemporaryDirectory(prefix="dsi-memory-test-") as tmp:
        cluster = memory.Cluster(Path(tmp))
        try:
            cluster.start()
            rows = memory.measure(cluster, BIG, settle=0.5)
            # The same oversized and refused requests again and again: nothing accumulates.
            again = []
            for _ in range(2):
                again += memory.measure(cluster, BIG, settle=0.5, warm=False)
        finally:
            cluster.stop()
        logs = {name: svc.log.read_text(errors="replace") for name, svc in cluster.services.items()}
    for name, text in logs.items():  # every refusal answered with a status, none logged as a crash
        assert "Traceback" not in text and '"level": "ERROR"' not in text, (name, text[-3000:])
    table = memory.table(rows)
    answers = {r.case: r.answer for r in rows}
    assert len(answers) == len(memory.cases(BIG)), table
    assert all(r.within for r in rows + again), table + "\n\n" + memory.table(again)
    for r in rows + again:
        # Back near idle once answered, whatever was sent: at most half above (freed memory the
        # allocator keeps for reuse, more of it under load; before issue 16 a refused 60 MB request
        # left 21 times the idle RSS, and twenty small ones 1.65 times).
        assert r.after_mib <= 1.5 * r.idle_mib, (r, table)
        assert "died" not in r.answer, table
    # The answers: oversized requests refused unread, bad ones with a message, ordinary ones served.
    big = f"{BIG / 1e6:g} MB"
    assert answers["generate, ordinary"] == "OK"
    for name in (f"generate, {big} of prompt ids", f"generate, {big} of prompt text", f"verify, {big} of context"):
        assert answers[name].startswith("RESOURCE_EXHAUSTED") and "larger than max" in answers[name], answers[name]
    assert answers[f"draft, {big} of context"].startswith("RESOURCE_EXHAUSTED"), table
    assert answers["generate, prompt ids just under the size limit"].startswith("INVALID_ARGUMENT"), table
    assert answers["generate, prompt text just under the size limit"].startswith("INVALID_ARGUMENT"), table
    assert answers["generate, 10,000 stop strings"].startswith("INVALID_ARGUMENT: at most 16 stop strings"), table
    assert answers["generate, a 200 kB stop string"].startswith("INVALID_ARGUMENT: stop string 0 has"), table
    assert answers["generate, 16 stop strings of 256 characters"] == "OK", table
    assert answers["generate, malformed protobuf"].startswith("INVALID_ARGUMENT"), table
    assert answers["verify, malformed protobuf"].startswith("INVALID_ARGUMENT"), table
    assert answers["HTTP, JSON nested 100,000 deep"].startswith("HTTP 400"), table
    assert answers[f"HTTP, {big} of JSON"].startswith("HTTP 413"), table
    assert answers[f"generate, {memory.CONCURRENT} at once, prompt ids just under the size limit"] == (
        f"INVALID_ARGUMENT x{memory.CONCURRENT}"
    ), table
