"""Proto hygiene with buf (pinned in clients/node/package-lock.json): lint
with the STANDARD rules, formatting, and the breaking-change check that CI
runs (tools/check_protos.sh), including how it picks its baseline. And
docs/api.md covers every rpc and message, with grpcurl examples that match
the contract.

The buf tests are skipped without buf (``npm ci --prefix clients/node``),
except where DSI_REQUIRE_NODE=1 (CI, see .ci/run), where that is an error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"
SCRIPT = ROOT / "tools" / "check_protos.sh"
MISSING = None if BUF.exists() else "buf is not installed (npm ci --prefix clients/node)"
if MISSING and os.environ.get("DSI_REQUIRE_NODE") == "1":
    raise RuntimeError(f"DSI_REQUIRE_NODE=1 but {MISSING}")
needs_buf = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
PROTOS = sorted((ROOT / "protos" / "dsi" / "v1").glob("*.proto"))
API_DOC = ROOT / "docs" / "api.md"


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def test_buf_config_is_v2_with_standard_lint_rules():
    text = (ROOT / "protos" / "buf.yaml").read_text()
    assert "version: v2" in text and "STANDARD" in text and "FILE" in text


@needs_buf
def test_buf_lint_passes_with_the_standard_rules():
    r = run(BUF, "lint", "protos")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_buf
def test_protos_are_buf_formatted():
    r = run(BUF, "format", "--diff", "--exit-code", "protos")
    assert r.returncode == 0, "run `clients/node/node_modules/.bin/buf format -w protos`:\n" + r.stdout


@needs_buf
def test_buf_breaking_catches_a_changed_field(tmp_path: Path):
    changed = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", changed)
    proto = changed / "dsi" / "v1" / "generation.proto"
    text = proto.read_text()
    assert "uint32 max_new_tokens = 3;" in text
    proto.write_text(text.replace("uint32 max_new_tokens = 3;", "uint64 max_new_tokens = 3;"))
    r = run(BUF, "breaking", changed, "--against", ROOT / "protos")
    assert r.returncode != 0 and "max_new_tokens" in r.stdout + r.stderr
    assert run(BUF, "breaking", ROOT / "protos", "--against", ROOT / "protos").returncode == 0


@needs_buf
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_ci_breaking_check_compares_the_latest_commit_with_its_parent(tmp_path: Path):
    """As in a fresh CI clone of main: HEAD against HEAD~1, and uncommitted
    changes against HEAD."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(SCRIPT, repo / "tools" / "check_protos.sh")
    env = {"BUF": str(BUF), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    script = repo / "tools" / "check_protos.sh"

    def git(*args: str) -> None:
        r = run("git", *args, cwd=repo, env=env)
        assert r.returncode == 0, r.stderr

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-qm", "first")
    r = run("bash", script, cwd=repo, env=env)
    assert r.returncode == 0 and "breaking-change check skipped" in r.stdout, r.stdout + r.stderr

    proto = repo / "protos" / "dsi" / "v1" / "generation.proto"
    text = proto.read_text()
    # A compatible change (a new field) passes.
    proto.write_text(
        text.replace("  repeated string stop = 10;\n", "  repeated string stop = 10;\n  // New.\n  bool x = 99;\n")
    )
    git("commit", "-qam", "compatible")
    r = run("bash", script, cwd=repo, env=env)
    assert r.returncode == 0 and "HEAD~1" in r.stdout, r.stdout + r.stderr
    # An uncommitted breaking change is compared with HEAD...
    proto.write_text(proto.read_text().replace("uint32 lookahead = 9;", "uint64 lookahead = 9;"))
    r = run("bash", script, cwd=repo, env=env)
    assert r.returncode != 0 and "lookahead" in r.stdout + r.stderr and "uncommitted" in r.stdout
    # ...and once committed, with its parent.
    git("commit", "-qam", "breaking")
    r = run("bash", script, cwd=repo, env=env)
    assert r.returncode != 0 and "lookahead" in r.stdout + r.stderr and "HEAD~1" in r.stdout
    # The escape hatch for a deliberate break.
    r = run("bash", script, cwd=repo, env={**env, "BUF_BREAKING_AGAINST": "none"})
    assert r.returncode == 0 and "skipped" in r.stdout


# --- docs/api.md ---------------------------------------------------------------------------


def test_api_doc_names_every_rpc_message_and_enum():
    text = "\n".join(p.read_text() for p in PROTOS)
    names = re.findall(r"^\s*(?:message|enum)\s+(\w+)", text, re.M) + re.findall(r"^\s*rpc\s+(\w+)", text, re.M)
    assert len(names) > 30
    doc = API_DOC.read_text()
    missing = [n for n in names if not re.search(rf"\b{n}\b", doc)]
    assert missing == [], f"docs/api.md does not mention {missing}"


def test_api_doc_has_a_grpcurl_example_per_rpc_whose_json_fits_the_contract():
    from google.protobuf import json_format

    from dsi.v1 import drafter_pb2, generation_pb2, target_pb2

    doc = API_DOC.read_text().replace("\\\n", " ")
    examples = re.findall(r"grpcurl -plaintext -d '([^']*)'\s+\S+\s+dsi\.v1\.(\w+)/(\w+)", doc)
    services = {
        m.services_by_name[n].full_name.split(".")[-1]: m.services_by_name[n]
        for m, n in [
            (generation_pb2.DESCRIPTOR, "GenerationService"),
            (target_pb2.DESCRIPTOR, "TargetService"),
            (drafter_pb2.DESCRIPTOR, "DrafterService"),
        ]
    }
    every = {(s, m.name) for s, d in services.items() for m in d.methods}
    assert {(s, m) for _, s, m in examples} == every
    modules = {"GenerationService": generation_pb2, "TargetService": target_pb2, "DrafterService": drafter_pb2}
    for body, service, method in examples:
        request_type = services[service].methods_by_name[method].input_type.name
        json_format.Parse(body, getattr(modules[service], request_type)())  # raises on an unknown field or bad value
        assert json.loads(body) is not None
