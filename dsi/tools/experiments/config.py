"""Experiment files: a cluster of target replicas and drafters per profile,
run parameters, and parameters to sweep.

TOML (``tomllib`` on Python >= 3.11, the ``tomli`` backport on 3.10: the same
parser, standard since 3.11, no YAML type surprises). Example::

    name = "vicuna-13b-68m"
    description = "..."

    [run]                     # every key optional; the CLI overrides them
    tokens = 100              # new tokens per generation
    repeats = 5               # rounds over the prompts, strategies interleaved
    prompts = 2               # distinct random prompts
    prompt_len = 16
    prompt_texts = ["..."]    # or these text prompts (the target's tokenizer), e.g. per profile
    lookahead = 5
    strategies = ["nonsi", "si", "dsi"]

    [[profile]]               # one or more; or put targets/drafters at top level
    name = "vicuna-13b-68m"
    source = "where the numbers come from"
    targets = [{ model = "synthetic:ttft_ms=40,tpot_ms=30", count = 4 }]
    drafters = [{ model = "synthetic:tpot_ms=2,acceptance=0.6", delay_ms = 1.5 }]

    [sweep]                   # the cartesian product is run, per profile
    lookahead = [3, 5, 8]
    sp = [1, 2, 4]            # target replicas a generation may use (max SP degree)
    "drafter.acceptance" = [0.5, 0.9]   # a synthetic spec key, or delay_ms
    "target.delay_ms" = [0, 5]

An instance: ``model`` (a synthetic spec or a local Hugging Face model
directory), ``device`` (cpu, cuda:N, mps), ``dtype``, ``delay_ms`` (one-way
network delay added on its link, in the coordinator's client channel) and
``count`` (that many identical instances).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsi.backends import is_ngram, is_synthetic
from dsi.tools.experiments.simulate import Node, SimConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STRATEGIES = ("nonsi", "si", "dsi")
RUN_KEYS = {
    "tokens": int,
    "repeats": int,
    "prompts": int,
    "prompt_len": int,
    "lookahead": int,
    "lookaheads": list,
    "seed": int,
    "warmup": int,
    "strategies": list,
    "launch": str,
    "sim_repeats": int,
    "hf_peers": bool,
    "prompt_texts": list,
}
SWEEP_KEYS = ("lookahead", "tokens", "sp")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Instance:
    model: str
    device: str = "cpu"
    dtype: str = "auto"
    delay_ms: float = 0.0

    @property
    def synthetic(self) -> bool:
        return is_synthetic(self.model)

    def spec_values(self) -> dict[str, str]:
        _, _, body = self.model.partition(":")
        out = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, _, raw = item.partition("=")
            out[key.strip()] = raw.strip()
        return out

    def with_key(self, key: str, value: Any) -> Instance:
        if key == "delay_ms":
            return replace(self, delay_ms=float(value))
        if key in ("device", "dtype", "model"):
            return replace(self, **{key: str(value)})
        if not self.synthetic:
            raise ConfigError(f"cannot set {key!r} on {self.model!r}: only synthetic specs have keys")
        values = self.spec_values()
        values[key] = f"{value:g}" if isinstance(value, float) else str(value)
        return replace(self, model="synthetic:" + ",".join(f"{k}={v}" for k, v in values.items()))

    def node(self) -> Node:
        from dsi.backends.synthetic import SyntheticSpec

        spec = SyntheticSpec.parse(self.model if ":" in self.model else "synthetic:")
        return Node(spec.ttft_ms, spec.tpot_ms, spec.verify_token_ms, spec.prefill_token_ms, self.delay_ms)


@dataclass(frozen=True)
class Cluster:
    targets: tuple[Instance, ...]
    drafters: tuple[Instance, ...]
    max_sp_degree: int = 0

    @property
    def synthetic(self) -> bool:
        return all(i.synthetic for i in (*self.targets, *self.drafters))

    @property
    def sp_degree(self) -> int:
        n = len(self.targets)
        return min(n, self.max_sp_degree) if self.max_sp_degree else n

    def drafter_spec(self) -> str:
        """The first drafter's synthetic spec (a bare ``synthetic`` as the defaults)."""
        model = self.drafters[0].model
        return model if ":" in model else "synthetic:"

    def sim_config(self, lookahead: int, tokens: int, prompt_len: int) -> SimConfig | None:
        """The simulator's model of this cluster (synthetic models only)."""
        if not self.synthetic or not self.drafters:
            return None
        from dsi.backends.synthetic import SyntheticSpec

        drafter = self.drafters[0]
        acceptance = SyntheticSpec.parse(self.drafter_spec()).acceptance
        return SimConfig(
            tuple(t.node() for t in self.targets),
            drafter.node(),
            acceptance,
            lookahead,
            tokens,
            prompt_len,
            max_sp_degree=self.max_sp_degree,
        )

    def describe(self) -> str:
        def one(i: Instance) -> str:
            d = f" +{i.delay_ms:g}ms" if i.delay_ms else ""
            dev = f" on {i.device}" if not i.synthetic else ""
            return f"{i.model}{dev}{d}"

        groups: dict[str, int] = {}
        for t in self.targets:
            groups[one(t)] = groups.get(one(t), 0) + 1
        ts = "; ".join(f"{n} x {k}" for k, n in groups.items())
        return f"targets: {ts} | drafter: {', '.join(one(d) for d in self.drafters)}"


@dataclass(frozen=True)
class Profile:
    name: str
    cluster: Cluster
    source: str = ""
    run: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Point:
    """One sweep point of one profile."""

    profile: Profile
    cluster: Cluster
    lookahead: int
    tokens: int
    values: Mapping[str, Any]  # the swept values, for the report

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.values.items())
        return self.profile.name + (f"[{extra}]" if extra else "")


@dataclass
class Experiment:
    name: str
    description: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    profiles: list[Profile] = field(default_factory=list)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    path: Path | None = None

    def points(self, run: Mapping[str, Any]) -> list[Point]:
        keys = list(self.sweep)
        out = []
        for prof in self.profiles:
            merged = {**run, **prof.run}
            for combo in itertools.product(*(self.sweep[k] for k in keys)) if keys else [()]:
                values = dict(zip(keys, combo, strict=True))
                cluster = prof.cluster
                lookahead, tokens = int(merged["lookahead"]), int(merged["tokens"])
                for key, value in values.items():
                    if key == "lookahead":
                        lookahead = int(value)
                    elif key == "tokens":
                        tokens = int(value)
                    elif key == "sp":
                        cluster = replace(cluster, max_sp_degree=int(value))
                    else:
                        cluster = _set_key(cluster, key, value)
                out.append(Point(prof, cluster, lookahead, tokens, values))
        return out


def _set_key(cluster: Cluster, key: str, value: Any) -> Cluster:
    role, _, name = key.partition(".")
    if role == "target":
        return replace(cluster, targets=tuple(t.with_key(name, value) for t in cluster.targets))
    if role == "drafter":
        return replace(cluster, drafters=tuple(d.with_key(name, value) for d in cluster.drafters))
    if key == "acceptance":
        return replace(cluster, drafters=tuple(d.with_key("acceptance", value) for d in cluster.drafters))
    raise ConfigError(f"unknown sweep key {key!r}: use {', '.join(SWEEP_KEYS)}, acceptance, target.KEY or drafter.KEY")


def _instances(items: Any, where: str, base: Path | None) -> tuple[Instance, ...]:
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, list):
        raise ConfigError(f"{where} must be a list of tables")
    out: list[Instance] = []
    for n, item in enumerate(items):
        if not isinstance(item, Mapping) or "model" not in item:
            raise ConfigError(f"{where}[{n}] needs a model")
        unknown = set(item) - {"model", "device", "dtype", "delay_ms", "count"}
        if unknown:
            raise ConfigError(f"{where}[{n}]: unknown key(s) {', '.join(sorted(unknown))}")
        model = str(item["model"])
        if not is_synthetic(model) and not is_ngram(model) and base is not None and not Path(model).is_absolute():
            model = str((base / model).resolve())
        inst = Instance(
            model, str(item.get("device", "cpu")), str(item.get("dtype", "auto")), float(item.get("delay_ms", 0))
        )
        count = int(item.get("count", 1))
        if count < 1:
            raise ConfigError(f"{where}[{n}]: count must be >= 1")
        if inst.delay_ms < 0:
            raise ConfigError(f"{where}[{n}]: delay_ms must be >= 0")
        out += [inst] * count
    return tuple(out)


def _profile(data: Mapping[str, Any], where: str, base: Path | None, default_name: str) -> Profile:
    if "targets" not in data:
        raise ConfigError(f"{where} needs targets")
    targets = _instances(data["targets"], f"{where}.targets", base)
    drafters = _instances(data.get("drafters", []), f"{where}.drafters", base)
    if not targets:
        raise ConfigError(f"{where} needs at least one target")
    run = _run(data.get("run", {}), f"{where}.run")
    return Profile(str(data.get("name", default_name)), Cluster(targets, drafters), str(data.get("source", "")), run)


def _run(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    unknown = set(data) - set(RUN_KEYS)
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(RUN_KEYS)}")
    out = dict(data)
    for s in out.get("strategies", []):
        if s not in STRATEGIES:
            raise ConfigError(f"[{where}]: unknown strategy {s!r}")
    return out


def parse(data: Mapping[str, Any], path: Path | None = None) -> Experiment:
    base = path.parent if path else None
    name = str(data.get("name", path.stem if path else "experiment"))
    profiles_data = data.get("profile", [])
    if isinstance(profiles_data, Mapping):
        profiles_data = [profiles_data]
    profiles = [_profile(p, f"profile[{i}]", base, f"{name}-{i}") for i, p in enumerate(profiles_data)]
    if "targets" in data:
        profiles.insert(0, _profile(data, "experiment", base, name))
    if not profiles:
        raise ConfigError("an experiment needs targets (top level) or [[profile]] tables")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ConfigError(f"profile names must be unique: {names}")
    sweep = data.get("sweep", {})
    if not isinstance(sweep, Mapping):
        raise ConfigError("[sweep] must be a table of lists")
    sweep = {str(k): (list(v) if isinstance(v, list) else [v]) for k, v in sweep.items()}
    for k, v in sweep.items():
        if not v:
            raise ConfigError(f"sweep {k!r} has no values")
        if k not in SWEEP_KEYS and k != "acceptance" and "." not in k:
            raise ConfigError(f"unknown sweep key {k!r}")
    known = {"name", "description", "run", "profile", "sweep", "targets", "drafters", "source"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    return Experiment(name, str(data.get("description", "")), _run(data.get("run", {}), "run"), profiles, sweep, path)


def load(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no experiment file at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    exp = parse(data, path)
    # validate every sweep point now, not halfway through a long run
    exp.points({"lookahead": 5, "tokens": 1, **exp.run})
    return exp


def single(
    target_model: str,
    targets: int,
    drafter_model: str,
    target_delay_ms: float = 0.0,
    drafter_delay_ms: float = 0.0,
    device: str = "cpu",
    dtype: str = "auto",
    name: str = "cli",
) -> Experiment:
    """The experiment the bench command line describes."""
    t = Instance(target_model, device, dtype, target_delay_ms)
    d = Instance(drafter_model, device, dtype, drafter_delay_ms)
    return Experiment(name, "", {}, [Profile(name, Cluster((t,) * targets, (d,) if drafter_model else ()))])


def grid_profile(base: Profile, fraction: float, acceptance: float) -> Cluster:
    """``base`` with the drafter set to ``fraction`` of the target's TPOT
    (TTFT likewise) and the given acceptance (the simulator's grid)."""
    target = base.cluster.targets[0]
    tpot = target.node().tpot_ms
    d = base.cluster.drafters[0]
    d = d.with_key("ttft_ms", round(fraction * tpot, 4)).with_key("tpot_ms", round(fraction * tpot, 4))
    d = d.with_key("acceptance", round(acceptance, 4))
    return replace(base.cluster, drafters=(d,) * max(1, len(base.cluster.drafters)))


def as_dict(cluster: Cluster) -> dict[str, Any]:
    return {
        "targets": [vars(t) for t in cluster.targets],
        "drafters": [vars(d) for d in cluster.drafters],
        "max_sp_degree": cluster.max_sp_degree,
    }


def merge_run(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        if layer:
            out.update({k: v for k, v in layer.items() if v is not None})
    return out


__all__: Sequence[str] = [
    "Cluster",
    "ConfigError",
    "Experiment",
    "Instance",
    "Point",
    "Profile",
    "load",
    "parse",
    "single",
]
