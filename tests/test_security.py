"""TLS, mutual TLS and bearer tokens on every hop: gRPC (targets, drafters,
the coordinator, and the coordinator's own channels to its peers), the
OpenAI-compatible HTTP API and /metrics; off by default.

Certificates are made fresh for each test (tests/certs.py); every server
listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsi.backends import LocalDrafter, LocalTarget, load_drafter_model, load_target_model
from dsi.domain import errors
from dsi.serving.gate import Policy
from dsi.serving.metrics import ServiceMetrics, serve_metrics
from dsi.serving.server import RunningServer, start_server
from dsi.wire.client import Client, request
from dsi.wire.security import ClientSecurity, ServerSecurity, read_token, token_matches
from dsi.wire.transport import GrpcDrafter, GrpcTarget
from services.coordinator.coordinator import Coordinator
from services.coordinator.discovery import build_coordinator
from services.coordinator.openai_api import start_openai_api
from services.coordinator.service import register as register_coordinator
from services.drafter.service import register as register_drafter
from services.target.service import register as register_target
from tests.certs import Authority, Pair, authority
from tests.helpers import LOOPBACK

T = "synthetic:vocab=300,seed=21,tpot_ms=1"
D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.6"
TOKEN = "s3cret-token_0123456789"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Pki:
    ca: Authority
    rogue: Authority  # a CA nobody trusts
    server: Pair  # names: localhost, 127.0.0.1, dsi-target, dsi-drafter
    client: Pair  # signed by ca
    rogue_client: Pair  # signed by rogue
    token_file: Path
    directory: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = authority(tmp_path / "ca", "dsi-test-ca")
    rogue = authority(tmp_path / "rogue", "rogue-ca")
    server = ca.issue(tmp_path, "server", dns=["localhost", "dsi-target", "dsi-drafter"], ips=["127.0.0.1"])
    client = ca.issue(tmp_path, "client")
    rogue_client = rogue.issue(tmp_path, "rogue-client")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return Pki(ca, rogue, server, client, rogue_client, token_file, tmp_path)


def mutual(pki: Pki, token: bool = False) -> ServerSecurity:
    return ServerSecurity.create(pki.server.cert, pki.server.key, pki.ca.cert, pki.token_file if token else None)


def trusted_client(pki: Pki, token: str | None = None, **kw) -> ClientSecurity:
    return ClientSecurity.create(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key, token=token, **kw)


@asynccontextmanager
async def target_server(security: ServerSecurity, **policy) -> AsyncIterator[RunningServer]:
    target = LocalTarget(load_target_model(T))
    running = await start_server(register_target(target), LOOPBACK, 0, Policy(security, **policy))
    try:
        yield running
    finally:
        await running.stop(0)


async def info_or_error(address: str, security: ClientSecurity | None, **kw) -> str:
    client = GrpcTarget(address, security=security, timeout=5, **kw)
    try:
        return f"ok {(await client.info()).model.vocab_size}"
    except errors.DsiError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()


# --- the pieces -----------------------------------------------------------------------------


def test_token_files_and_matching(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("  abc.DEF-123\n")
    assert read_token(f) == "abc.DEF-123"
    for bad in ("", "two words", "tab\there"):
        f.write_text(bad)
        with pytest.raises(errors.InvalidArgument):
            read_token(f)
    with pytest.raises(errors.InvalidArgument, match="cannot read the token file"):
        read_token(tmp_path / "missing")
    assert token_matches("Bearer abc", "abc") and token_matches("bearer  abc ", "abc")
    for header in (None, "", "abc", "Basic abc", "Bearer abd", "Bearer abcd", "Bearer"):
        assert not token_matches(header, "abc"), header


def test_server_security_refuses_incomplete_or_unreadable_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="go together"):
        ServerSecurity.create(cert=pki.server.cert)
    with pytest.raises(errors.InvalidArgument, match="needs TLS"):
        ServerSecurity.create(ca=pki.ca.cert)
    not_a_key = tmp_path / "garbage.key"
    not_a_key.write_text("not a key\n")
    with pytest.raises(errors.InvalidArgument, match="cannot use the TLS files"):
        ServerSecurity.create(pki.server.cert, not_a_key)
    with pytest.raises(errors.InvalidArgument, match="go together"):
        ClientSecurity.create(cert=pki.client.cert)
    assert ServerSecurity().describe() == "plaintext"
    assert mutual(pki, token=True).describe() == "mutual TLS + bearer token"


# --- gRPC -----------------------------------------------------------------------------------


async def test_tls_server_refuses_plaintext_and_untrusted_servers_are_refused(pki: Pki) -> None:
    async with target_server(ServerSecurity.create(pki.server.cert, pki.server.key)) as srv:
        assert (await info_or_error(srv.address, ClientSecurity.create(ca=pki.ca.cert))) == "ok 300"
        assert (await info_or_error(srv.address, None)).startswith("Unavailable")  # plaintext to a TLS port
        # The client does not trust the server's CA, or the name does not match: refused by the client.
        assert (await info_or_error(srv.address, ClientSecurity.create(ca=pki.rogue.cert))).startswith("Unavailable")
        wrong_name = ClientSecurity.create(ca=pki.ca.cert, server_name="someone-else")
        assert (await info_or_error(srv.address, wrong_name)).startswith("Unavailable")


async def test_mutual_tls_admits_only_clients_with_a_trusted_certificate(pki: Pki) -> None:
    async with target_server(mutual(pki)) as srv:
        assert (await info_or_error(srv.address, trusted_client(pki))) == "ok 300"
        no_cert = ClientSecurity.create(ca=pki.ca.cert)
        rogue = ClientSecurity.create(ca=pki.ca.cert, cert=pki.rogue_client.cert, key=pki.rogue_client.key)
        for security in (None, no_cert, rogue):
            outcome = await info_or_error(srv.address, security)
            assert outcome.startswith("Unavailable"), outcome


async def test_bearer_token_on_grpc_health_stays_open(pki: Pki) -> None:
    async with target_server(ServerSecurity.create(token_file=pki.token_file)) as srv:
        assert (await info_or_error(srv.address, ClientSecurity(token=TOKEN))) == "ok 300"
        for security, reason in ((None, "missing"), (ClientSecurity(token="wrong"), "invalid")):
            outcome = await info_or_error(srv.address, security)
            assert outcome.startswith("Unauthenticated: target") and f"{reason} bearer token" in outcome, outcome
        # Health checks (probes, load balancers) need no token.
        async with grpc.aio.insecure_channel(srv.address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # Reflection is not open: it describes the API.
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                ):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_port_serves_probes_in_plaintext_next_to_a_mutual_tls_port(pki: Pki) -> None:
    async with target_server(mutual(pki, token=True), health_port=0) as srv:
        assert srv.health_port and srv.health_port != srv.port
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{srv.health_port}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # Only health there: the model's API is not reachable on it.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary("/dsi.v1.TargetService/Info")(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await srv.health.enter_graceful_shutdown()
        async with grpc.aio.insecure_channel(f"{LOOPBACK}:{srv.health_port}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_every_hop_with_mutual_tls_and_tokens_generates_the_same_tokens(pki: Pki) -> None:
    """Targets and a drafter with mutual TLS and a token, found by a DNS name
    (dialled by IP address, their certificate checked for the name), a
    coordinator with mutual TLS and a token in front: an authenticated client
    gets exactly the tokens of an all-plaintext cluster; anyone else gets nothing."""
    from services.coordinator.discovery import Resolver

    async with AsyncExitStack() as stack:
        servers = {}
        for kind, reg, backend in (
            ("dsi-target", register_target, LocalTarget(load_target_model(T))),
            ("dsi-target-2", register_target, LocalTarget(load_target_model(T))),
            ("dsi-drafter", register_drafter, LocalDrafter(load_drafter_model(D))),
        ):
            srv = await start_server(reg(backend), LOOPBACK, 0, Policy(mutual(pki, token=True)))
            stack.push_async_callback(srv.stop, 0)
            servers[kind] = srv

        class Names(Resolver):
            async def resolve(self, host: str, port: int) -> list[str]:
                return {
                    "dsi-target": [servers["dsi-target"].address, servers["dsi-target-2"].address],
                    "dsi-drafter": [servers["dsi-drafter"].address],
                }[host]

        port = {k: s.port for k, s in servers.items()}
        peers = trusted_client(pki, token=TOKEN)
        import functools

        coordinator = await build_coordinator(
            [f"dns:///dsi-target:{port['dsi-target']}"],
            [f"dns:///dsi-drafter:{port['dsi-drafter']}"],
            functools.partial(GrpcTarget, security=peers),
            functools.partial(GrpcDrafter, security=peers),
            timeout=10,
            resolver=Names(),
            interval=3600,
        )
        stack.push_async_callback(coordinator.close)
        assert len(coordinator.targets) == 2  # both replicas reached by IP with the certificate of the name
        front = await start_server(register_coordinator(coordinator), LOOPBACK, 0, Policy(mutual(pki, token=True)))
        stack.push_async_callback(front.stop, 0)

        req = request("", [5, 6, 7], 40, "dsi")
        async with Client(front.address, trusted_client(pki, token=TOKEN)) as client:
            secured = await client.generate(req)
        assert secured.finish_reason == "length" and len(secured.token_ids) == 40
        reference = await plaintext_reference([5, 6, 7], 40)
        assert secured.token_ids == reference

        for security, error in (
            (trusted_client(pki), errors.Unauthenticated),  # the right certificate, no token
            (trusted_client(pki, token="nope"), errors.Unauthenticated),
            (ClientSecurity.create(ca=pki.ca.cert, token=TOKEN), errors.Unavailable),  # the token, no certificate
            (None, errors.Unavailable),
        ):
            async with Client(front.address, security) as client:
                with pytest.raises(error):
                    await asyncio.wait_for(client.generate(req), 10)


async def plaintext_reference(ids: list[int], n: int) -> list[int]:
    target = LocalTarget(load_target_model(T))
    drafter = LocalDrafter(load_drafter_model(D))
    coordinator = await Coordinator.connect([("t", target)], [("d", drafter)])
    try:
        out = []
        from services.coordinator.coordinator import GenerateInput
        from services.coordinator.engine import Strategy

        async for o in coordinator.generate(
            GenerateInput(prompt_token_ids=ids, max_new_tokens=n, strategy=Strategy.NONSI)
        ):
            out += o.token_ids
        return out
    finally:
        await coordinator.close()


# --- HTTP -----------------------------------------------------------------------------------


async def test_openai_api_and_metrics_over_mutual_tls_with_a_token(pki: Pki) -> None:
    target = LocalTarget(load_target_model(T))
    coordinator = await Coordinator.connect([("t", target)], [])
    security = mutual(pki, token=True)
    _, server = await start_openai_api(coordinator, LOOPBACK, 0, "m", grace=0.5, security=security)
    metrics = await serve_metrics(ServiceMetrics("target", target).registry, LOOPBACK, 0, security=security)
    good = trusted_client(pki).ssl_context()
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "strategy": "nonsi"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert server.url.startswith("https://") and metrics.url.startswith("https://")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/completions", json=body, headers=auth, ssl=good) as r:
                assert r.status == 200, await r.text()
                assert len((await r.json())["choices"][0]["token_ids"]) == 4
            async with s.get(f"{metrics.url}/metrics", headers=auth, ssl=good) as r:
                assert r.status == 200 and "dsi_target_requests_total" in await r.text()
            for url in (f"{server.url}/v1/completions", f"{metrics.url}/metrics"):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    method = s.post if url.endswith("completions") else s.get
                    async with method(url, json=body, headers=headers, ssl=good) as r:
                        assert r.status == 401, (url, headers, r.status)
                        assert r.headers["WWW-Authenticate"] == "Bearer"
                        err = (await r.json())["error"]
                        assert err["type"] == "authentication_error" and "bearer token" in err["message"]
            async with s.get(f"{server.url}/health", ssl=good) as r:  # open: load balancers send no token
                assert r.status == 200
            # No client certificate, or one from a CA the server does not trust: no TLS session at all.
            rogue = ClientSecurity.create(ca=pki.ca.cert, cert=pki.rogue_client.cert, key=pki.rogue_client.key)
            for ctx in (ClientSecurity.create(ca=pki.ca.cert).ssl_context(), rogue.ssl_context()):
                with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                    async with s.post(f"{server.url}/v1/completions", json=body, headers=auth, ssl=ctx) as r:
                        await r.read()
            with pytest.raises(aiohttp.ClientError):  # plaintext HTTP to the TLS port
                async with s.get(f"http://{server.address}/health") as r:
                    await r.read()
    finally:
        await server.stop()
        await metrics.stop()
        await coordinator.close()


# --- the command line, as deployed ------------------------------------------------------------


def _spawn(tmp: Path, name: str, *argv: str) -> tuple[subprocess.Popen, Path]:
    announce = tmp / f"{name}.addr"
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "dsi", *argv, "--host", LOOPBACK, "--port", "0", "--announce", str(announce)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
    return proc, announce


def _wait(proc: subprocess.Popen, announce: Path, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not announce.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return announce.read_text().strip()


def test_the_cli_serves_and_generates_over_mutual_tls_with_tokens(pki: Pki) -> None:
    """``dsi target``/``drafter``/``coordinator`` with --tls-* and
    --auth-token-file, the coordinator's --peer-* flags, and ``dsi generate``
    with the client flags: the tokens of a plaintext run; a client without a
    certificate or without the token fails with a message and exit code 1."""
    tmp = pki.directory
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca.cert)]
    auth = ["--auth-token-file", str(pki.token_file)]
    peer = ["--peer-tls-ca", str(pki.ca.cert), "--peer-tls-cert", str(pki.client.cert)]
    peer += ["--peer-tls-key", str(pki.client.key), "--peer-auth-token-file", str(pki.token_file)]
    procs = []
    try:
        t, ta = _spawn(tmp, "target", "target", "--model", T, *tls, *auth)
        d, da = _spawn(tmp, "drafter", "drafter", "--model", D, *tls, *auth)
        procs += [t, d]
        t_addr, d_addr = _wait(t, ta, tmp / "target.log"), _wait(d, da, tmp / "drafter.log")
        c, ca = _spawn(tmp, "coordinator", "coordinator", "--target", t_addr, "--drafter", d_addr, *tls, *auth, *peer)
        procs.append(c)
        c_addr = _wait(c, ca, tmp / "coordinator.log")
        assert '"security": "mutual TLS + bearer token"' in (tmp / "coordinator.log").read_text()

        def generate(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
            argv = [sys.executable, "-m", "dsi", "generate", "--coordinator", c_addr, "--prompt-ids", "5,6,7"]
            argv += ["--max-new-tokens", "30", "--strategy", "si", "--json", *flags]
            return subprocess.run(
                argv, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
            )

        client = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
        ok = generate(*client, "--auth-token-file", str(pki.token_file))
        assert ok.returncode == 0, ok.stderr
        tokens = json.loads(ok.stdout)["token_ids"]
        assert len(tokens) == 30
        from_env = generate(*client, env={"DSI_AUTH_TOKEN": TOKEN})  # the token from the environment
        assert from_env.returncode == 0 and json.loads(from_env.stdout)["token_ids"] == tokens, from_env.stderr
        no_token = generate(*client)
        assert no_token.returncode == 1 and "missing bearer token" in no_token.stderr, no_token.stderr
        no_cert = generate("--tls-ca", str(pki.ca.cert), "--auth-token-file", str(pki.token_file))
        assert no_cert.returncode == 1 and "is unavailable" in no_cert.stderr, no_cert.stderr
        assert "Traceback" not in no_token.stderr + no_cert.stderr
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    for name in ("target", "drafter", "coordinator"):
        assert "Traceback" not in (tmp / f"{name}.log").read_text()


def test_a_bad_tls_file_stops_a_server_at_start_with_a_message(pki: Pki) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dsi", "target", "--model", T, "--port", "0", "--tls-cert", str(pki.server.cert)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "--tls-cert and --tls-key go together" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


async def test_off_by_default() -> None:
    """No flags: plaintext and no token, as `dsi up` and the loopback demos use."""
    target = LocalTarget(load_target_model(T))
    running = await start_server(register_target(target), LOOPBACK, 0)
    try:
        assert (await info_or_error(running.address, None)) == "ok 300"
    finally:
        await running.stop(0)
