"""The Node.js client (clients/node) against a coordinator on synthetic
services: it must receive exactly the tokens the Python client receives.

Needs ``node`` and the client's packages (``npm ci --prefix clients/node``).
Without them the tests are skipped, except where DSI_REQUIRE_NODE=1 (CI, see
.ci/run), where they fail instead."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from dsi.wire.client import Client, request
from tests.helpers import local_cluster

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "clients" / "node"
SCRIPT = CLIENT_DIR / "generate.js"
NODE = shutil.which("node")
MISSING = (
    "node is not installed"
    if NODE is None
    else "the Node client's packages are not installed (npm ci --prefix clients/node)"
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
    else None
)
if MISSING and os.environ.get("DSI_REQUIRE_NODE") == "1":
    raise RuntimeError(f"DSI_REQUIRE_NODE=1 but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

T = "synthetic:vocab=300,seed=21,tpot_ms=2"
D = "synthetic:vocab=300,seed=21,tpot_ms=0,acceptance=0.6"


async def node(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run the client without blocking the event loop that serves the cluster."""
    proc = await asyncio.create_subprocess_exec(
        NODE, str(SCRIPT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def node_json(address: str, *args: str) -> dict:
    code, out, err = await node("--coordinator", address, "--json", *args)
    assert code == 0, err
    return json.loads(out)


async def test_node_client_receives_exactly_the_python_clients_tokens():
    async with local_cluster([T, T], [D], serve_coordinator=True) as c:
        address = c.coordinator_address
        async with Client(address) as py:
            for strategy in ("nonsi", "si", "dsi"):
                ref = await py.generate(request("", [1, 2, 3], 40, strategy, lookahead=3))
                got = await node_json(
                    address,
                    "--prompt-ids",
                    "1,2,3",
                    "--max-new-tokens",
                    "40",
                    "--strategy",
                    strategy,
                    "--lookahead",
                    "3",
                )
                assert got["token_ids"] == ref.token_ids, strategy
                assert len(got["token_ids"]) == 40
                assert got["text"] == ref.text
                assert got["finish_reason"] == ref.finish_reason == "length"
                assert set(got["stats"]) == set(ref.stats), "stats fields differ from the Python client's"
                assert got["stats"]["new_tokens"] == 40


async def test_node_client_sampling_with_a_large_seed_matches_python():
    """uint64 seeds travel exactly (as decimal strings); sampling is
    reproducible from the seed."""
    seed = 2**63 + 12345
    async with local_cluster([T], [D], serve_coordinator=True) as c:
        async with Client(c.coordinator_address) as py:
            ref = await py.generate(request("", [5, 6], 25, "si", temperature=0.9, top_k=20, seed=seed))
        got = await node_json(
            c.coordinator_address,
            "--prompt-ids",
            "5,6",
            "--max-new-tokens",
            "25",
            "--strategy",
            "si",
            "--temperature",
            "0.9",
            "--top-k",
            "20",
            "--seed",
            str(seed),
        )
        assert got["token_ids"] == ref.token_ids
        assert got["stats"]["seed"] == str(seed) == str(ref.stats["seed"])


async def test_node_client_without_a_seed_gets_a_fresh_one_it_can_repeat():
    sampled = ("--prompt-ids", "5,6", "--max-new-tokens", "25", "--strategy", "dsi", "--temperature", "1")
    async with local_cluster([T, T], [D], serve_coordinator=True) as c:
        first = await node_json(c.coordinator_address, *sampled)
        second = await node_json(c.coordinator_address, *sampled)
        assert first["stats"]["seed"] != second["stats"]["seed"]
        assert first["token_ids"] != second["token_ids"]
        again = await node_json(c.coordinator_address, *sampled, "--seed", first["stats"]["seed"])
        assert again["token_ids"] == first["token_ids"] and again["stats"]["seed"] == first["stats"]["seed"]


async def test_node_client_streams_text_and_reports_errors():
    async with local_cluster([T], [D], serve_coordinator=True) as c:
        address = c.coordinator_address
        code, out, err = await node("--coordinator", address, "--prompt-ids", "1", "--max-new-tokens", "8")
        assert code == 0, err
        assert len(out.split()) == 8 and "-- 8 tokens" in err and "finish: length" in err
        code, out, err = await node("--coordinator", address, "--prompt-ids", "1,300")
        assert code == 1 and "INVALID_ARGUMENT" in err and "outside the vocabulary" in err
        code, out, _ = await node("--coordinator", address, "--info")
        assert code == 0 and json.loads(out)["targets"][0]["model"]["vocab_size"] == 300
        code, _, err = await node("--prompt-ids", "x")
        assert code == 2 and "--prompt-ids" in err


async def test_node_client_over_mutual_tls_with_a_token(tmp_path):
    """The Node client's --tls-ca/--tls-cert/--tls-key/--auth-token-file
    against a coordinator that requires all of them: the Python client's
    tokens; without the token UNAUTHENTICATED, without a certificate no
    connection."""
    from dsi.serving.gate import Policy
    from dsi.serving.server import start_server
    from dsi.wire.security import ClientSecurity, ServerSecurity
    from services.coordinator.service import register
    from tests.certs import authority

    ca = authority(tmp_path / "ca")
    server = ca.issue(tmp_path, "server", dns=["localhost"], ips=["127.0.0.1"])
    client = ca.issue(tmp_path, "client")
    token = tmp_path / "token"
    token.write_text("node-token\n")
    async with local_cluster([T, T], [D]) as c:
        security = ServerSecurity.create(server.cert, server.key, ca.cert, token)
        running = await start_server(register(c.coordinator), "127.0.0.1", 0, Policy(security))
        try:
            py_security = ClientSecurity.create(ca=ca.cert, cert=client.cert, key=client.key, token_file=token)
            async with Client(running.address, py_security) as py:
                ref = await py.generate(request("", [1, 2, 3], 20, "dsi"))
            tls = ["--tls-ca", str(ca.cert), "--tls-cert", str(client.cert), "--tls-key", str(client.key)]
            args = ("--prompt-ids", "1,2,3", "--max-new-tokens", "20", "--strategy", "dsi")
            got = await node_json(running.address, *tls, "--auth-token-file", str(token), *args)
            assert got["token_ids"] == ref.token_ids and len(ref.token_ids) == 20
            code, _, err = await node("--coordinator", running.address, "--json", *tls, *args)
            assert code == 1 and "UNAUTHENTICATED" in err and "missing bearer token" in err, err
            code, _, err = await node(
                "--coordinator", running.address, "--tls-ca", str(ca.cert), "--auth-token-file", str(token), *args
            )
            assert code == 1 and "UNAVAILABLE" in err, err
            code, _, err = await node("--tls-cert", str(client.cert), *args)
            assert code == 2 and "go together" in err
        finally:
            await running.stop(0)
