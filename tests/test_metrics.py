"""Prometheus metrics: scraped after generations, the numbers move
consistently with the generations' own stats (coordinator) and with the
ServiceCounters that Info reports (targets, drafters). Last, the real
``dsi`` processes with --metrics-port and --http-port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest

from dsi.serving.metrics import CoordinatorMetrics, ServiceMetrics, parse_text, serve_metrics
from dsi.v1 import generation_pb2, generation_pb2_grpc
from dsi.wire.client import Client, request
from services.coordinator.openai_api import start_openai_api
from tests.helpers import LOOPBACK, eventually, local_cluster

T = "synthetic:vocab=300,seed=21,tpot_ms=3"
D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.6"


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return parse_text(await resp.text())


def approx(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


async def test_coordinator_metrics_follow_the_generation_stats():
    async with local_cluster([T, T], [D], serve_coordinator=True) as c, aiohttp.ClientSession() as s:
        metrics = CoordinatorMetrics(c.coordinator)
        server = await serve_metrics(metrics.registry, LOOPBACK, 0)
        _, http = await start_openai_api(c.coordinator, LOOPBACK, 0, "m")
        try:
            before = await scrape(s, server.url)
            assert before["dsi_verifications_in_flight"] == 0
            for srv in c.servers[:2]:
                assert before[f'dsi_replica_in_flight{{address="{srv.address}",kind="target"}}'] == 0
            assert before['dsi_replicas{kind="target"}'] == 2 and before['dsi_replicas{kind="drafter"}'] == 1

            async with Client(c.coordinator_address) as py:
                results = [await py.generate(request("", [1, 2, 3], 30, "dsi", lookahead=3)) for _ in range(2)]
                results.append(await py.generate(request("", [4], 12, "nonsi")))
            # One more through the OpenAI endpoint: it counts the same way.
            async with s.post(
                f"{http.url}/v1/completions",
                json={"prompt": [5, 6], "max_tokens": 9, "temperature": 0, "strategy": "si"},
            ) as resp:
                assert resp.status == 200
                si_stats = (await resp.json())["dsi"]["stats"]

            m = await scrape(s, server.url)
            dsi = [r.stats for r in results[:2]]
            assert m['dsi_requests_total{outcome="length",strategy="dsi"}'] == 2
            assert m['dsi_requests_total{outcome="length",strategy="nonsi"}'] == 1
            assert m['dsi_requests_total{outcome="length",strategy="si"}'] == 1
            assert m['dsi_requests_in_progress{strategy="dsi"}'] == 0
            assert m['dsi_generated_tokens_total{strategy="dsi"}'] == 60
            assert m['dsi_generated_tokens_total{strategy="si"}'] == 9
            for name, field in [
                ("drafted_tokens", "drafted_tokens"),
                ("accepted_tokens", "accepted_tokens"),
                ("target_forward_passes", "target_forward_passes"),
                ("verifications_started", "verifications_started"),
                ("verifications_cancelled", "verifications_cancelled"),
                ("preemptions", "preemptions"),
                ("draft_streams", "draft_streams"),
            ]:
                assert m[f'dsi_{name}_total{{strategy="dsi"}}'] == sum(st[field] for st in dsi), name
                assert m[f'dsi_{name}_total{{strategy="si"}}'] == si_stats[field], name
            assert m['dsi_drafted_tokens_total{strategy="nonsi"}'] == 0
            assert m['dsi_target_forward_passes_total{strategy="nonsi"}'] == 12
            # Histograms: one observation per generation, with the generation's own numbers.
            ttft = m['dsi_time_to_first_token_seconds_sum{strategy="dsi"}']
            assert m['dsi_time_to_first_token_seconds_count{strategy="dsi"}'] == 2
            assert approx(ttft, sum(st["time_to_first_token_seconds"] for st in dsi))
            tpot = sum((st["wall_seconds"] - st["time_to_first_token_seconds"]) / 29 for st in dsi)
            assert approx(m['dsi_time_per_output_token_seconds_sum{strategy="dsi"}'], tpot)
            assert m['dsi_generation_seconds_count{strategy="nonsi"}'] == 1
            rate = m['dsi_acceptance_rate_sum{strategy="dsi"}']
            assert approx(rate, sum(st["acceptance_rate"] for st in dsi))
            assert m['dsi_acceptance_rate_count{strategy="dsi"}'] == 2
            assert 'dsi_acceptance_rate_count{strategy="nonsi"}' not in m  # no drafts decided
            decided = m['dsi_decided_draft_tokens_total{strategy="dsi"}']
            assert decided >= m['dsi_accepted_tokens_total{strategy="dsi"}'] > 0
            assert m["dsi_verifications_in_flight"] == 0

            # Errors and disconnects are outcomes too.
            stub = generation_pb2_grpc.GenerationServiceStub(grpc.aio.insecure_channel(c.coordinator_address))
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stub.Generate(generation_pb2.GenerateRequest(prompt_token_ids=[1, 300])):
                    pass
            call = stub.Generate(generation_pb2.GenerateRequest(prompt_token_ids=[1], max_new_tokens=1000, strategy=3))
            async for msg in call:
                if msg.token_ids:
                    break
            m = await scrape(s, server.url)
            assert m['dsi_requests_in_progress{strategy="dsi"}'] == 1
            call.cancel()

            async def outcome(name: str) -> float:
                return (await scrape(s, server.url)).get(f'dsi_requests_total{{outcome="{name}",strategy="dsi"}}', 0)

            assert await outcome("invalid_argument") == 1
            for _ in range(200):  # bounded: the server sees the cancellation within a few ms
                if await outcome("disconnected") == 1:
                    break
                await asyncio.sleep(0.01)
            m = await scrape(s, server.url)
            assert m['dsi_requests_total{outcome="disconnected",strategy="dsi"}'] == 1
            assert m['dsi_requests_in_progress{strategy="dsi"}'] == 0
        finally:
            await http.stop()
            await server.stop()


async def test_in_flight_verifications_and_replica_load_while_generating():
    t = "synthetic:vocab=300,seed=4,tpot_ms=20"
    d = "synthetic:vocab=300,seed=4,tpot_ms=1,acceptance=0.9"
    async with local_cluster([t] * 3, [d], serve_coordinator=True) as c, aiohttp.ClientSession() as s:
        metrics = CoordinatorMetrics(c.coordinator)
        server = await serve_metrics(metrics.registry, LOOPBACK, 0)
        try:
            async with Client(c.coordinator_address) as py:
                task = asyncio.ensure_future(py.generate(request("", [1], 60, "dsi", lookahead=2)))
                peak, peak_replicas = 0.0, 0.0
                for _ in range(300):  # bounded; a scrape every few ms while the generation runs
                    if task.done():
                        break
                    m = await scrape(s, server.url)
                    loads = [m[f'dsi_replica_in_flight{{address="{a.address}",kind="target"}}'] for a in c.servers[:3]]
                    assert m["dsi_verifications_in_flight"] == sum(loads)
                    peak = max(peak, m["dsi_verifications_in_flight"])
                    peak_replicas = max(peak_replicas, sum(1 for x in loads if x))
                    await asyncio.sleep(0.005)
                await task
            assert peak >= 2 and peak_replicas >= 2, "DSI never had verifications in flight on several replicas"
            m = await scrape(s, server.url)
            assert m["dsi_verifications_in_flight"] == 0
        finally:
            await server.stop()


async def test_target_and_drafter_metrics_match_their_counters():
    async with local_cluster([T, T], [D], serve_coordinator=True) as c, aiohttp.ClientSession() as s:
        services = [("target", lt) for lt in c.local_targets] + [("drafter", ld) for ld in c.local_drafters]
        servers = []
        for role, backend in services:  # one registry each: three services, one process, no clash
            servers.append(await serve_metrics(ServiceMetrics(role, backend).registry, LOOPBACK, 0))
        try:
            async with Client(c.coordinator_address) as py:
                result = await py.generate(request("", [1, 2, 3], 40, "dsi", lookahead=3))
            await eventually(lambda: all(len(b.sessions) == 0 for _, b in services))
            total_passes = 0
            for (role, backend), server in zip(services, servers, strict=True):
                m = await scrape(s, server.url)
                k = backend.counters
                p = f"dsi_{role}"
                assert m[f"{p}_forward_passes_total"] == k.forward_passes > 0
                assert m[f"{p}_computed_tokens_total"] == k.computed_tokens
                assert m[f"{p}_cached_tokens_total"] == k.cached_tokens
                assert m[f"{p}_requests_total"] == k.requests
                assert m[f"{p}_cancelled_requests_total"] == k.cancelled_requests
                # One histogram observation per forward pass; the batch sizes add up to the computed tokens.
                assert m[f"{p}_forward_tokens_count"] == k.forward_passes
                assert m[f"{p}_forward_tokens_sum"] == k.computed_tokens
                assert m[f"{p}_forward_cached_tokens_sum"] == k.cached_tokens
                assert m[f"{p}_forward_seconds_count"] == k.forward_passes
                assert m[f"{p}_sessions"] == 0 and m[f"{p}_busy_sessions"] == 0
                [info] = [key for key in m if key.startswith(f"{p}_model_info{{")]
                assert f'model_id="{backend.model.info.model_id}"' in info and 'backend="synthetic"' in info
                assert m[info] == 1
                if role == "target":
                    total_passes += k.forward_passes
                else:
                    assert m["dsi_drafter_drafted_tokens_total"] == k.drafted_tokens >= result.stats["drafted_tokens"]
                    assert m["dsi_drafter_active_streams"] == 0
            # Every pass the coordinator counted ran on a target (some more were cancelled unused).
            assert total_passes >= result.stats["target_forward_passes"]
        finally:
            for server in servers:
                await server.stop()


# --- the real processes -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


async def wait_for_file(path: Path, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> str:
    for _ in range(int(timeout / 0.05)):
        try:
            return await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            pass
        if proc.returncode is not None:
            raise AssertionError(f"{path.name}: the process exited with {proc.returncode}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path.name} was not written within {timeout}s")


async def test_dsi_processes_serve_metrics_and_the_openai_api(tmp_path: Path):
    procs: list[asyncio.subprocess.Process] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    async def start(*args: str) -> asyncio.subprocess.Process:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dsi", *args, "--log-format", "text", "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        procs.append(p)
        return p

    try:
        ports = {name: free_port() for name in ("target", "drafter", "coordinator", "http")}
        target = await start("target", "--model", T, "--port", "0", "--announce", str(tmp_path / "t"),
                             "--metrics-port", str(ports["target"]))  # fmt: skip
        drafter = await start("drafter", "--model", D, "--port", "0", "--announce", str(tmp_path / "d"),
                              "--metrics-port", str(ports["drafter"]))  # fmt: skip
        t_addr = await wait_for_file(tmp_path / "t", target)
        d_addr = await wait_for_file(tmp_path / "d", drafter)
        coordinator = await start(
            "coordinator", "--target", t_addr, "--drafter", d_addr, "--port", "0", "--announce", str(tmp_path / "c"),
            "--http-port", str(ports["http"]), "--metrics-port", str(ports["coordinator"]),
            "--served-model-name", "synthetic-13b", "--grace", "1",
        )  # fmt: skip
        await wait_for_file(tmp_path / "c", coordinator)

        client = openai.AsyncOpenAI(base_url=f"http://{LOOPBACK}:{ports['http']}/v1", api_key="-", max_retries=0)
        try:
            assert [m.id for m in (await client.models.list()).data] == ["synthetic-13b"]
            r = await client.completions.create(
                model="synthetic-13b", prompt=[1, 2, 3], max_tokens=16, temperature=0, extra_body={"strategy": "si"}
            )
            assert r.usage.completion_tokens == 16
        finally:
            await client.close()
        stats = r.model_extra["dsi"]["stats"]
        async with aiohttp.ClientSession() as s:
            m = await scrape(s, f"http://{LOOPBACK}:{ports['coordinator']}")
            assert m['dsi_requests_total{outcome="length",strategy="si"}'] == 1
            assert m['dsi_drafted_tokens_total{strategy="si"}'] == stats["drafted_tokens"]
            t = await scrape(s, f"http://{LOOPBACK}:{ports['target']}")
            assert t["dsi_target_forward_passes_total"] == stats["target_forward_passes"]
            d = await scrape(s, f"http://{LOOPBACK}:{ports['drafter']}")
            assert d["dsi_drafter_drafted_tokens_total"] == stats["drafted_tokens"]
        # SIGTERM: every process shuts down gracefully, HTTP servers included.
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            _, err = await asyncio.wait_for(p.communicate(), 20)
            assert p.returncode == 0, err.decode()[-2000:]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


def test_parse_text_reads_labels_and_values():
    text = '# TYPE x counter\nx_total{a="1",b="2"} 3.0\n# TYPE y gauge\ny 4\n'
    assert parse_text(text) == {'x_total{a="1",b="2"}': 3.0, "y": 4.0}
    assert json.dumps(parse_text(text))  # plain data
