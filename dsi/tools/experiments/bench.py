"""``dsi bench``: measure non-SI, SI and DSI through real services.

Starts the target replicas, drafters and coordinator an experiment describes
(``--experiment FILE``, or the command line's ``--target-model`` etc.), or uses
a running coordinator (``--coordinator HOST:PORT``), and runs every strategy on
the same prompts in one run: for each repeat and prompt, the strategies one
after the other in a rotating order. Greedy decoding, so every strategy must
return the same tokens (checked).

For synthetic clusters, every point is also simulated (``dsi simulate``'s
model, same parameters), and measured / simulated latency is the overhead of
the real system. ``--grid`` runs the simulator's Figure-1 grid through the
services (coarser: it is wall-clock bound). With Hugging Face model
directories, Hugging Face's own ``generate`` and assisted generation
(``generate(assistant_model=...)``) run on the same prompts as peers.

Writes into one folder: runs.csv (one row per generation), summary.csv (per
point and strategy), speedups.csv (per point), results.json, report.md and
plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsi.backends.ngram import is_ngram
from dsi.tools.experiments import config as xconfig
from dsi.tools.experiments import load
from dsi.tools.experiments.simulate import STRATEGIES, TIE_LINK_MS, simulate_config, write_csv

DEFAULT_RUN = {
    "tokens": 64,
    "repeats": 3,
    "prompts": 2,
    "prompt_len": 16,
    "lookahead": 5,
    "seed": 0,
    "warmup": 1,
    "strategies": list(STRATEGIES),
    "launch": "subprocess",
    "sim_repeats": 200,
    "hf_peers": True,
}
HF_PEERS = ("hf_generate", "hf_assisted")
#: SI and DSI with the lookahead chosen as they run (``lookahead = 0``), next to the fixed ones:
#: ``--strategies ...,si_auto,dsi_auto`` or ``--auto-lookahead``. Their simulated latency is that
#: of the fixed lookahead their strategy runs with, so "overhead" compares with the model's best k.
AUTO = {"si_auto": "si", "dsi_auto": "dsi"}


# --- one generation -------------------------------------------------------------------------------


async def generate_once(
    client: Any, prompt: list[int], tokens: int, strategy: str, lookahead: int, timeline: bool = False
) -> dict:
    """Stream one generation; times are client-side (the request leaves ->
    the last token arrives). With ``timeline``, the result has the schedule
    (``"timeline"``, a :class:`dsi.domain.timeline.Timeline`)."""
    from dsi.wire import convert
    from dsi.wire.client import FINISH_NAMES, request, stats_dict

    req = request(prompt_ids=prompt, max_new_tokens=tokens, strategy=strategy, lookahead=lookahead, timeline=timeline)
    schedule = None
    ids: list[int] = []
    first = last = 0.0
    stats: dict[str, Any] = {}
    finish = ""
    start = time.perf_counter()
    async for msg in client.stream(req):
        now = time.perf_counter()
        if msg.token_ids:
            ids.extend(msg.token_ids)
            last = now
            if not first:
                first = now
        if msg.finish_reason:
            finish = FINISH_NAMES[msg.finish_reason]
            stats = stats_dict(msg.stats)
            if msg.HasField("timeline"):
                schedule = convert.timeline_from_pb(msg.timeline)
    end = time.perf_counter()
    return {
        "token_ids": ids,
        "latency_ms": (last - start) * 1000 if last else math.nan,
        "total_ms": (end - start) * 1000,
        "ttft_ms": (first - start) * 1000 if first else math.nan,
        "finish_reason": finish,
        "stats": stats,
        "timeline": schedule,
    }


def _row(point: xconfig.Point, strategy: str, lookahead: int, rep: int, p_idx: int, res: dict) -> dict:
    s = res["stats"]
    n = len(res["token_ids"])
    return {
        "profile": point.profile.name,
        "point": point.label,
        **{f"sweep_{k}": v for k, v in point.values.items()},
        "strategy": strategy,
        "lookahead": lookahead if strategy not in ("nonsi", "hf_generate") else 0,
        "sp_degree": point.cluster.sp_degree,
        "repeat": rep,
        "prompt": p_idx,
        "tokens": n,
        "latency_ms": res["latency_ms"],
        "ms_per_token": res["latency_ms"] / n if n else math.nan,
        "tokens_per_pass": n / s["target_forward_passes"] if s.get("target_forward_passes") else math.nan,
        "total_ms": res["total_ms"],
        "ttft_ms": res["ttft_ms"],
        "server_wall_ms": 1000 * s.get("wall_seconds", math.nan),
        "acceptance_rate": s.get("acceptance_rate", math.nan),
        "target_forward_passes": s.get("target_forward_passes", math.nan),
        "verifications_started": s.get("verifications_started", math.nan),
        "verifications_cancelled": s.get("verifications_cancelled", math.nan),
        "preemptions": s.get("preemptions", math.nan),
        "draft_streams": s.get("draft_streams", math.nan),
        "drafted_tokens": s.get("drafted_tokens", math.nan),
        "finish_reason": res["finish_reason"],
    }


# --- Hugging Face peers -----------------------------------------------------------------------------


class HFPeers:
    """Hugging Face's own decoding on the same model directories."""

    def __init__(self, target: xconfig.Instance, drafter: xconfig.Instance | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        def load(inst: xconfig.Instance) -> Any:
            dtype = None if inst.dtype == "auto" else getattr(torch, inst.dtype)
            m = AutoModelForCausalLM.from_pretrained(inst.model, local_files_only=True, dtype=dtype)
            return m.to(inst.device).eval()

        self.torch = torch
        self.device = target.device
        self.model = load(target)
        self.assistant = load(drafter) if drafter is not None else None

    def run(self, prompt: list[int], tokens: int, assisted: bool, lookahead: int) -> dict:
        torch = self.torch
        ids = torch.tensor([prompt], device=self.device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        if assisted:
            cfg = self.assistant.generation_config
            cfg.num_assistant_tokens = lookahead
            cfg.num_assistant_tokens_schedule = "constant"
            cfg.assistant_confidence_threshold = 0.0
            kwargs["assistant_model"] = self.assistant
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, **kwargs)
        ms = (time.perf_counter() - start) * 1000
        new = out[0, len(prompt) :].tolist()
        return {
            "token_ids": new,
            "latency_ms": ms,
            "total_ms": ms,
            "ttft_ms": math.nan,
            "finish_reason": "",
            "stats": {},
        }


# --- a point: all strategies, repeats and prompts -------------------------------------------------


def text_prompts(model_dir: str, texts: Sequence[str]) -> list[list[int]]:
    """Text prompts (``run.prompt_texts``) in the target's tokens, by its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return [list(tokenizer.encode(t)) for t in texts]


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    hi = max(2, min(vocab, 32000))
    return [rng.integers(0, hi, size=length).tolist() for _ in range(n)]


async def run_point(
    client: Any,
    point: xconfig.Point,
    run: dict[str, Any],
    prompts: list[list[int]],
    bar: Any,
    lookaheads: dict[str, int] | None = None,
    peers: HFPeers | None = None,
    skip: Sequence[str] = (),
    timeline: tuple[int, int] | None = None,
    timeline_dir: Path | None = None,
    outputs: dict[int, tuple[list[int], list[int]]] | None = None,
) -> list[dict]:
    """Every strategy on every prompt, ``run["repeats"]`` times, after a
    warm-up. With ``timeline`` = (repeat, prompt), that run of every strategy
    also writes its schedule to ``timeline_dir`` (see :mod:`dsi.tools.timeline`).
    ``outputs`` gets (prompt, output) of each prompt, by its index."""
    strategies = [s for s in run["strategies"] if s not in skip]
    if peers is not None:
        strategies += list(HF_PEERS) if peers.assistant is not None else ["hf_generate"]
    from dsi.wire.client import AUTO as AUTO_LOOKAHEAD

    ks = {s: 0 if s in AUTO else (lookaheads or {}).get(s, point.lookahead) for s in strategies}

    async def one(strategy: str, prompt: list[int], tokens: int, schedule: bool = False) -> dict:
        if strategy in HF_PEERS:
            assert peers is not None
            return await asyncio.to_thread(peers.run, prompt, tokens, strategy == "hf_assisted", ks[strategy])
        # si_auto / dsi_auto ask for the automatic lookahead (a request's 0 is the server's default, a fixed one)
        k = AUTO_LOOKAHEAD if strategy in AUTO else ks[strategy]
        return await generate_once(client, prompt, tokens, AUTO.get(strategy, strategy), k, schedule)

    for _ in range(int(run["warmup"])):  # sessions, channels, caches, lazy imports
        for s in strategies:
            await one(s, prompts[0], min(point.tokens, 8))
    rows = []
    reference: dict[int, list[int]] = {}
    for rep in range(int(run["repeats"])):
        for p_idx, prompt in enumerate(prompts):
            shift = (rep + p_idx) % len(strategies)
            for s in strategies[shift:] + strategies[:shift]:
                res = await one(s, prompt, point.tokens, timeline == (rep, p_idx))
                if res.get("timeline") is not None and timeline_dir is not None:
                    write_timeline(res["timeline"], timeline_dir / f"{_slug(point.label)}-{s}-r{rep}-p{p_idx}")
                row = _row(point, s, ks[s], rep, p_idx, res)
                if s not in HF_PEERS:
                    ref = reference.setdefault(p_idx, res["token_ids"])
                    row["matches"] = res["token_ids"] == ref
                    if outputs is not None:
                        outputs.setdefault(p_idx, (prompt, ref))
                else:
                    ref = reference.get(p_idx)
                    row["matches"] = ref is None or res["token_ids"] == ref
                rows.append(row)
                bar.update(1)
    return rows


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "point"


def write_timeline(t: Any, stem: Path) -> None:
    """The schedule of one run as STEM.json (Chrome trace events) and STEM.png."""
    from dsi.tools.timeline import write

    write(t, stem)  # without matplotlib: the JSON alone


def simulate_point(
    point: xconfig.Point, run: dict[str, Any], lookaheads: dict[str, int] | None = None, links_ms: float = 0.0
) -> dict:
    """Simulated mean latency (ms) per strategy for this point, if synthetic;
    ``links_ms`` more on every link (:data:`dsi.tools.experiments.simulate.TIE_LINK_MS`)."""
    out: dict[str, float] = {}
    for s in STRATEGIES:
        k = (lookaheads or {}).get(s, point.lookahead)
        cfg = point.cluster.sim_config(k, point.tokens, int(run["prompt_len"]))
        if cfg is None:
            return {}
        best = simulate_config(cfg.with_links(links_ms), int(run["sim_repeats"]), int(run["seed"]), [k], [s])
        out[s] = best[s].mean_ms
    return out


def replay_point(
    point: xconfig.Point,
    run: dict[str, Any],
    outputs: dict[int, tuple[list[int], list[int]]],
    lookaheads: dict[str, int] | None = None,
    links_ms: float = 0.0,
) -> dict:
    """The model's latency (ms) per strategy on this point's own accept/reject
    draws (synthetic pairs): each prompt's output replayed through the
    simulator (:func:`dsi.backends.synthetic.drafter_right_along`), the mean
    over prompts. :func:`simulate_point` averages over draws of the
    acceptance instead, so a run of a few dozen tokens that happened to see
    more rejections than the mean reads as overhead there; here it does not."""
    if not point.cluster.synthetic or not point.cluster.drafters or not outputs:
        return {}
    from dsi.backends.synthetic import drafter_right_along
    from dsi.tools.experiments.simulate import simulate_one

    spec = point.cluster.drafter_spec()
    draws = [
        drafter_right_along(spec, prompt, out)
        for prompt, out in outputs.values()
        if len(out) == point.tokens  # not one that ended early (EOS): the model runs to the end
    ]
    if not draws:
        return {}
    out: dict[str, float] = {}
    for s in STRATEGIES:
        cfg = point.cluster.sim_config((lookaheads or {}).get(s, point.lookahead), point.tokens, int(run["prompt_len"]))
        if cfg is None:
            return {}
        cfg = cfg.with_links(links_ms)
        out[s] = float(np.mean([simulate_one(cfg, right, [s])[s].latency_ms for right in draws]))
    return out


# --- summaries ------------------------------------------------------------------------------------


#: The models a run is compared with, by the suffix of their ratio's key (``overhead{suffix}``,
#: ``{strategy}_overhead{suffix}``): the column of the model's latency in summary.csv. "": the model
#: (:func:`simulate_point`); "_replay": on the run's own draws (:func:`replay_point`); "_1us_links":
#: both with links of ``TIE_LINK_MS``.
MODEL_COLUMNS = {
    "": "simulated_latency_ms",
    "_replay": "simulated_replay_ms",
    "_1us_links": "simulated_1us_links_ms",
    "_replay_1us_links": "simulated_replay_1us_links_ms",
}


def summarize(rows: list[dict], models: dict[str, dict[str, dict]]) -> tuple[list[dict], list[dict]]:
    """(per point x strategy, per point). ``models``: by suffix of
    :data:`MODEL_COLUMNS`, the model's latency (ms) by point and strategy."""
    summary, speedups = [], []
    points = list(dict.fromkeys(r["point"] for r in rows))
    for point in points:
        prow = [r for r in rows if r["point"] == point]
        by_model = {suffix: models.get(suffix, {}).get(point, {}) for suffix in MODEL_COLUMNS}
        sim = by_model[""]
        means: dict[str, float] = {}
        for s in dict.fromkeys(r["strategy"] for r in prow):
            rs = [r for r in prow if r["strategy"] == s]
            lat = np.array([r["latency_ms"] for r in rs], dtype=float)
            mpt = np.array([r["ms_per_token"] for r in rs], dtype=float)
            means[s] = float(np.mean(lat))
            compared: dict[str, float] = {}
            for suffix, column in MODEL_COLUMNS.items():
                model_ms = by_model[suffix].get(AUTO.get(s, s), math.nan)
                compared[column] = model_ms
                compared[f"overhead{suffix}"] = means[s] / model_ms if model_ms else math.nan
            summary.append(
                {
                    "profile": rs[0]["profile"],
                    "point": point,
                    "strategy": s,
                    "lookahead": rs[0]["lookahead"],
                    "sp_degree": rs[0]["sp_degree"],
                    "runs": len(rs),
                    "tokens": int(np.median([r["tokens"] for r in rs])),
                    "ms_per_token_median": float(np.median(mpt)),
                    "ms_per_token_p10": float(np.percentile(mpt, 10)),
                    "ms_per_token_p90": float(np.percentile(mpt, 90)),
                    "ms_per_token_min": float(np.min(mpt)),
                    "ms_per_token_max": float(np.max(mpt)),
                    "latency_ms_mean": means[s],
                    "latency_ms_std": float(np.std(lat, ddof=1)) if len(lat) > 1 else 0.0,
                    **compared,
                    "acceptance_rate": _mean(rs, "acceptance_rate"),
                    "tokens_per_pass": _mean(rs, "tokens_per_pass"),
                    "verifications_started": _mean(rs, "verifications_started"),
                    "verifications_cancelled": _mean(rs, "verifications_cancelled"),
                    "draft_streams": _mean(rs, "draft_streams"),
                    "all_match": all(bool(r.get("matches", True)) for r in rs),
                }
            )

        def ratio(a: str, b: str, src: dict[str, float]) -> float:
            return src[a] / src[b] if a in src and b in src and src[b] else math.nan

        entry = {"profile": prow[0]["profile"], "point": point}
        entry.update({f"sweep_{k[6:]}": v for k, v in prow[0].items() if k.startswith("sweep_")})
        for a, b in (("dsi", "si"), ("dsi", "nonsi"), ("si", "nonsi")):
            entry[f"{a}_over_{b}_measured"] = ratio(a, b, means)
            entry[f"{a}_over_{b}_simulated"] = ratio(a, b, sim)
        if "hf_assisted" in means:
            entry["dsi_over_hf_assisted"] = ratio("dsi", "hf_assisted", means)
            entry["dsi_over_hf_generate"] = ratio("dsi", "hf_generate", means)
        for s in STRATEGIES:
            for suffix, model in by_model.items():
                entry[f"{s}_overhead{suffix}"] = means[s] / model[s] if s in means and model.get(s) else math.nan
        for auto, fixed in AUTO.items():
            if auto in means:
                entry[f"{auto}_over_{fixed}_measured"] = ratio(auto, fixed, means)
        speedups.append(entry)
    return summary, speedups


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None and not _isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def report_md(meta: dict, summary: list[dict], speedups: list[dict]) -> str:
    lines = [f"# dsi bench: {meta['name']}", "", f"`{meta['command']}`", ""]
    lines.append(
        f"machine: {meta['machine']}; launch: {meta['run']['launch']};"
        f" load average at start {meta.get('load_average_at_start')}, at end {meta.get('load_average_at_end')}"
    )
    lines.append("")
    lines.append(
        "| point | DSI/SI measured | DSI/SI simulated | DSI/non-SI measured | DSI/non-SI simulated |"
        " SI/non-SI measured | SI/non-SI simulated |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for e in speedups:
        lines.append(
            f"| {e['point']} | {_f(e['dsi_over_si_measured'])} | {_f(e['dsi_over_si_simulated'])} |"
            f" {_f(e['dsi_over_nonsi_measured'])} | {_f(e['dsi_over_nonsi_simulated'])} |"
            f" {_f(e['si_over_nonsi_measured'])} | {_f(e['si_over_nonsi_simulated'])} |"
        )
    autos = [(a, f) for a, f in AUTO.items() if speedups and f"{a}_over_{f}_measured" in speedups[0]]
    if autos:
        lines += ["", "Lookahead chosen as it runs (k = 0) / the fixed k, measured:", ""]
        for e in speedups:
            ratios = (f"{a} / {f} {_f(e.get(f'{a}_over_{f}_measured', math.nan))}" for a, f in autos)
            lines.append(f"- {e['point']}: " + ", ".join(ratios))
    lines += [
        "",
        "| point | strategy | k | ms/token median [p10, p90] | simulated ms/token | measured/simulated |"
        " measured/replayed | measured/simulated, 1 µs links | acceptance | tokens/target pass | cancelled verifs |"
        " same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        sim_mpt = s["simulated_latency_ms"] / s["tokens"] if s["tokens"] else math.nan
        lines.append(
            f"| {s['point']} | {s['strategy']} | {s['lookahead']} | {s['ms_per_token_median']:.2f}"
            f" [{s['ms_per_token_p10']:.2f}, {s['ms_per_token_p90']:.2f}] | {_f(sim_mpt, 2)} | {_f(s['overhead'])} |"
            f" {_f(s.get('overhead_replay', math.nan))} | {_f(s.get('overhead_1us_links', math.nan))} |"
            f" {_f(s['acceptance_rate'], 2)} | {_f(s.get('tokens_per_pass', math.nan), 2)} |"
            f" {_f(s['verifications_cancelled'], 1)} |"
            f" {'yes' if s['all_match'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def _f(v: Any, nd: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if math.isnan(x) else f"{x:.{nd}f}"


# --- calibration: what one RPC and one timer cost here ------------------------------------------


async def calibrate(launch: str, log_dir: Path | None) -> dict[str, Any]:
    """Timer overshoot of asyncio.sleep, and the per-step overhead of each
    strategy with zero-latency synthetic models (pure system overhead)."""
    from dsi.tools.experiments import cluster as xcluster
    from dsi.wire.client import Client

    loop = asyncio.get_running_loop()
    timer: dict[str, float] = {}
    for ms in (0.5, 1.0, 2.0, 5.0):
        over = []
        for _ in range(30):
            t0 = loop.time()
            await asyncio.sleep(ms / 1000)
            over.append((loop.time() - t0) * 1000 - ms)
        timer[f"sleep_{ms:g}ms_overshoot_ms"] = float(np.median(over))
    zero = xconfig.Cluster(
        (xconfig.Instance("synthetic:vocab=32000,seed=1"),) * 2,
        (xconfig.Instance("synthetic:vocab=32000,seed=1,acceptance=0.7"),),
    )
    running = await xcluster.start(zero, launch, log_dir)
    out: dict[str, Any] = {"timer": timer}
    try:
        async with Client(running.address) as client:
            prompt = list(range(1, 17))
            for s in STRATEGIES:
                await generate_once(client, prompt, 8, s, 5)
                res = [await generate_once(client, prompt, 64, s, 5) for _ in range(3)]
                mid = sorted(res, key=lambda r: r["latency_ms"])[1]
                st = mid["stats"]
                out[s] = {
                    "ms_per_token": mid["latency_ms"] / 64,
                    "ms_per_verification": mid["latency_ms"] / max(1, st.get("verifications_started", 1)),
                    "verifications": st.get("verifications_started"),
                    "draft_streams": st.get("draft_streams"),
                }
    finally:
        await running.close()
    return out


# --- the command ----------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _range(text: str) -> tuple[float, float]:
    lo, hi = (float(t) for t in text.split(","))
    return lo, hi


# Without --experiment: a target like a 13B model (30 ms per step) and a 68M-like drafter.
SYNTHETIC_TARGET = "synthetic:vocab=32000,seed=1,ttft_ms=40,tpot_ms=30"
SYNTHETIC_DRAFTER = "synthetic:vocab=32000,seed=1,ttft_ms=3,tpot_ms=2,acceptance=0.7"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", metavar="FILE", help="experiment file (TOML); see experiments/")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="use this running coordinator instead of starting one")
    g = p.add_argument_group("cluster (without --experiment)")
    g.add_argument("--target-model", default=SYNTHETIC_TARGET, metavar="SPEC", help="(default: %(default)s)")
    g.add_argument("--targets", type=int, default=4, help="target replicas (default: %(default)s)")
    g.add_argument("--drafter-model", default=SYNTHETIC_DRAFTER, metavar="SPEC", help="(default: %(default)s)")
    g.add_argument("--target-delay-ms", type=float, default=0.0, help="one-way delay on each target link")
    g.add_argument("--drafter-delay-ms", type=float, default=0.0, help="one-way delay on the drafter link")
    g.add_argument("--device", default="cpu", help="device for Hugging Face models (default: %(default)s)")
    g.add_argument("--dtype", default="auto")
    g = p.add_argument_group("run (override the experiment's [run])")
    g.add_argument("--tokens", type=int, help=f"new tokens per generation (default: {DEFAULT_RUN['tokens']})")
    g.add_argument(
        "--repeats", type=int, help=f"rounds over prompts and strategies (default: {DEFAULT_RUN['repeats']})"
    )
    g.add_argument("--prompts", type=int, help=f"distinct prompts (default: {DEFAULT_RUN['prompts']})")
    g.add_argument("--prompt-len", type=int, help=f"prompt tokens (default: {DEFAULT_RUN['prompt_len']})")
    g.add_argument("--lookahead", type=int, help=f"draft tokens per chunk (default: {DEFAULT_RUN['lookahead']})")
    g.add_argument(
        "--lookaheads",
        type=_ints,
        metavar="K,K",
        help="synthetic clusters: SI and DSI each use the simulator's best of these (default: --lookahead)",
    )
    g.add_argument(
        "--strategies",
        help="comma-separated subset of nonsi,si,dsi,si_auto,dsi_auto (default: nonsi,si,dsi; *_auto: the"
        " lookahead chosen as the generation runs)",
    )
    g.add_argument(
        "--auto-lookahead",
        action="store_true",
        help="also run SI and DSI with the lookahead chosen as they run (si_auto, dsi_auto), next to the fixed one",
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--warmup", type=int, help="warm-up rounds, not recorded (default: 1)")
    g.add_argument("--launch", choices=["subprocess", "inproc"], help="how to start services (default: subprocess)")
    g.add_argument("--sim-repeats", type=int, help="simulator draws per point (default: 200)")
    g.add_argument("--no-hf-peers", action="store_true", help="skip Hugging Face generate() peers")
    g.add_argument("--no-calibrate", action="store_true", help="skip the timer/RPC overhead calibration")
    g.add_argument(
        "--overhead",
        action="store_true",
        help="only the overhead budget per token, part by part, zero-latency models (see docs/benchmarks.md)",
    )
    g = p.add_argument_group("grid (the simulator's heatmap, measured)")
    g.add_argument("--grid", action="store_true", help="sweep drafter latency fraction x acceptance (synthetic)")
    g.add_argument("--grid-size", type=_ints, default=(5, 5), metavar="NF,NA", help="(default: 5,5)")
    g.add_argument("--fraction-range", type=_range, default=(0.01, 1.0), metavar="LO,HI")
    g.add_argument("--acceptance-range", type=_range, default=(0.01, 0.99), metavar="LO,HI")
    g.add_argument(
        "--grid-lookaheads",
        type=_ints,
        default=(1, 2, 3, 5, 8),
        metavar="K,K",
        help="per cell, SI and DSI use the simulator's best of these (default: 1,2,3,5,8)",
    )
    g.add_argument("--sim-grid", metavar="DIR", help="a `dsi simulate --grid` folder to plot beside the measured grid")
    p.add_argument(
        "--timeline",
        type=_ints,
        nargs="?",
        const=(0, 0),
        metavar="REPEAT,PROMPT",
        help="also record the schedule of that run (default 0,0: the first prompt of the first repeat) of every"
        " strategy and point, as OUT/timelines/POINT-STRATEGY-rREPEAT-pPROMPT.json (Chrome trace events) and .png",
    )
    load.add_arguments(p)
    p.add_argument("--out", help="output folder (default: results/bench/NAME)")
    p.add_argument("--replot", metavar="DIR", help="only redraw the plots of an earlier run's folder")
    p.add_argument("--no-progress", action="store_true")


def _experiment(args: argparse.Namespace) -> xconfig.Experiment:
    if args.experiment:
        return xconfig.load(args.experiment)
    return xconfig.single(
        args.target_model,
        args.targets,
        args.drafter_model,
        args.target_delay_ms,
        args.drafter_delay_ms,
        args.device,
        args.dtype,
        name="bench",
    )


def _run_params(args: argparse.Namespace, exp: xconfig.Experiment) -> dict[str, Any]:
    cli = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "lookahead": args.lookahead,
        "lookaheads": list(args.lookaheads) if args.lookaheads else None,
        "seed": args.seed,
        "warmup": args.warmup,
        "launch": args.launch,
        "sim_repeats": args.sim_repeats,
        "strategies": args.strategies.split(",") if args.strategies else None,
        "hf_peers": False if args.no_hf_peers else None,
    }
    run = xconfig.merge_run(DEFAULT_RUN, exp.run, cli)
    if getattr(args, "auto_lookahead", False):
        run["strategies"] = [*run["strategies"], *(a for a, f in AUTO.items() if f in run["strategies"])]
    bad = [s for s in run["strategies"] if s not in STRATEGIES and s not in AUTO]
    if bad:
        raise SystemExit(f"dsi bench: unknown strategy {bad[0]!r}")
    return run


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        from dsi.tools.experiments.simulate import _NoBar

        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="dsi bench", unit="gen", file=sys.stderr, dynamic_ncols=True)


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine shows here."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s) ({cpu}), Python {platform.python_version()}"
    )


async def amain(args: argparse.Namespace) -> int:
    from dsi.tools.experiments import cluster as xcluster
    from dsi.wire.client import Client

    if args.timeline is not None and len(args.timeline) != 2:
        raise SystemExit("dsi bench: --timeline takes REPEAT,PROMPT (two numbers, e.g. 0,0)")
    if args.overhead:
        from dsi.tools.experiments import overhead

        budget = argparse.Namespace(
            tokens=args.tokens or 256,
            prompt_len=args.prompt_len or 16,
            lookahead=args.lookahead or 5,
            rounds=args.repeats or 5,
            profile=None,
            json=str(Path(args.out) / "overhead.json") if args.out else None,
        )
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - start-up
        await overhead.arun(budget)
        return 0
    exp = _experiment(args)
    run = _run_params(args, exp)
    out = Path(args.out or f"results/bench/{exp.name}{'-grid' if args.grid else ''}")
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - start-up
    meta: dict[str, Any] = {
        "name": exp.name,
        "description": exp.description,
        "command": "dsi bench " + " ".join(getattr(args, "_argv", None) or []),
        "machine": machine(),
        "run": run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": _loadavg(),
    }
    started = time.perf_counter()
    if not args.no_calibrate and not args.coordinator:
        print("calibrating (timer granularity, per-RPC overhead with zero-latency models)...", file=sys.stderr)
        meta["calibration"] = await calibrate(run["launch"], out / "logs")
    # the points to run
    jobs: list[tuple[xconfig.Point, dict[str, int] | None, Sequence[str]]] = []
    if args.grid:
        base = exp.profiles[0]
        if not base.cluster.synthetic:
            raise SystemExit("dsi bench --grid needs a synthetic cluster")
        from dsi.tools.experiments.simulate import grid_axes

        nf, na = (args.grid_size * 2)[:2]
        fracs, accs = grid_axes(nf, na, args.fraction_range, args.acceptance_range)
        meta["grid"] = {"fractions": fracs.tolist(), "acceptances": accs.tolist(), "lookaheads": args.grid_lookaheads}
        first = True
        for a in accs:
            for f in fracs:
                cl = xconfig.grid_profile(base, float(f), float(a))
                values = {"drafter_fraction": round(float(f), 4), "acceptance": round(float(a), 4)}
                point = xconfig.Point(base, cl, int(run["lookahead"]), int(run["tokens"]), values)
                cfg = cl.sim_config(int(run["lookahead"]), int(run["tokens"]), int(run["prompt_len"]))
                assert cfg is not None
                best = simulate_config(cfg, 3, int(run["seed"]), args.grid_lookaheads, ("si", "dsi"), True)
                ks = {s: best[s].lookahead for s in ("si", "dsi")}
                # non-SI does not touch the drafter: measure it once, on the first cell
                jobs.append((point, ks, () if first else ("nonsi",)))
                first = False
    else:
        for p in exp.points(run):
            ks = None
            cfg = p.cluster.sim_config(p.lookahead, p.tokens, int(run["prompt_len"]))
            if run.get("lookaheads") and cfg is not None and "lookahead" not in p.values:
                best = simulate_config(cfg, 20, int(run["seed"]), [int(k) for k in run["lookaheads"]], ("si", "dsi"))
                ks = {s: best[s].lookahead for s in ("si", "dsi")}
            jobs.append((p, ks, ()))
    per_point = int(run["repeats"]) * int(run["prompts"])
    total = sum(per_point * len([s for s in run["strategies"] if s not in skip]) for _, _, skip in jobs)
    bar = _progress(total, not args.no_progress)
    rows: list[dict] = []
    model_ms: dict[str, dict[str, dict]] = {suffix: {} for suffix in MODEL_COLUMNS}
    running = None
    current: xconfig.Cluster | None = None
    peers_cache: dict[tuple, HFPeers] = {}
    try:
        for point, ks, skip in jobs:
            address = args.coordinator
            if not address:
                if running is None or current != point.cluster:
                    if running is not None:
                        await running.close()
                        running = None
                    running = await xcluster.start(point.cluster, run["launch"], out / "logs")
                    current = point.cluster
                address = running.address
            peers = None
            point_run = {**run, **point.profile.run}
            if run["hf_peers"] and not point.cluster.synthetic and not args.coordinator:
                models = [d for d in point.cluster.drafters if not is_ngram(d.model)]  # assisted: a model drafter
                key = (point.cluster.targets[0], models[0] if models else None)
                if key not in peers_cache:
                    peers_cache[key] = await asyncio.to_thread(HFPeers, *key)
                peers = peers_cache[key]
                bar.total += per_point * (2 if peers.assistant is not None else 1)
            async with Client(address) as client:
                info = await client.info()
                vocab = info.targets[0].model.vocab_size if info.targets else 32000
                if point_run.get("prompt_texts"):
                    prompts = text_prompts(point.cluster.targets[0].model, point_run["prompt_texts"])
                else:
                    prompts = make_prompts(int(run["prompts"]), int(run["prompt_len"]), vocab, int(run["seed"]))
                chosen = tuple(args.timeline) if args.timeline else None
                outputs: dict[int, tuple[list[int], list[int]]] = {}
                point_rows = await run_point(
                    client, point, point_run, prompts, bar, ks, peers, skip, chosen, out / "timelines", outputs
                )
            if skip and "nonsi" in skip and rows:  # the grid's single non-SI measurement
                base_rows = [
                    dict(r, point=point.label, **{f"sweep_{k}": v for k, v in point.values.items()})
                    for r in rows
                    if r["strategy"] == "nonsi" and r["point"] == jobs[0][0].label
                ]
                point_rows = base_rows + point_rows
            rows += point_rows
            if not args.coordinator or args.experiment:  # an experiment file describes the running cluster
                for links, suffix in ((0.0, ""), (TIE_LINK_MS, "_1us_links")):
                    model_ms[suffix][point.label] = simulate_point(point, run, ks, links)
                    model_ms[f"_replay{suffix}"][point.label] = replay_point(point, run, outputs, ks, links)
    finally:
        bar.close()
        if running is not None:
            await running.close()
    meta["seconds"] = time.perf_counter() - started
    meta["load_average_at_end"] = _loadavg()
    summary, speedups = summarize(rows, model_ms)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "speedups.csv", speedups)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "speedups": speedups}, indent=2, default=str)
    )
    (out / "report.md").write_text(report_md(meta, summary, speedups))
    pngs = _plots(out, rows, summary, speedups, args)
    print(report_md(meta, summary, speedups))
    mismatches = [s for s in summary if not s["all_match"] and s["strategy"] not in HF_PEERS]
    if mismatches:
        print(
            "WARNING: strategies returned different tokens for the same prompt: "
            + ", ".join(f"{m['point']}/{m['strategy']}" for m in mismatches),
            file=sys.stderr,
        )
    print(
        f"{len(rows)} generations in {meta['seconds']:.0f}s; written to {out}: runs.csv, summary.csv, "
        f"speedups.csv, results.json, report.md" + "".join(f", {p}" for p in pngs),
        file=sys.stderr,
    )
    return 1 if mismatches else 0


def _plots(
    out: Path, rows: list[dict], summary: list[dict], speedups: list[dict], args: argparse.Namespace
) -> list[str]:
    try:
        from dsi.tools.experiments import plots
    except ImportError as exc:
        print(f"dsi bench: no plots ({exc}); install matplotlib: pip install 'dsi[experiments]'", file=sys.stderr)
        return []
    names = [] if args.grid else [plots.latency_boxes(rows, out, summary)]
    if args.grid:
        grid_rows = []
        for e in speedups:
            grid_rows.append(
                {
                    "drafter_fraction": e["sweep_drafter_fraction"],
                    "acceptance": e["sweep_acceptance"],
                    "dsi_over_si": e["dsi_over_si_measured"],
                    "dsi_over_nonsi": e["dsi_over_nonsi_measured"],
                    "si_over_nonsi": e["si_over_nonsi_measured"],
                    "dsi_over_best": e["dsi_over_nonsi_measured"] / min(1.0, e["si_over_nonsi_measured"]),
                    **{
                        f"{s}_overhead{suffix}": e[f"{s}_overhead{suffix}"]
                        for suffix in MODEL_COLUMNS
                        for s in STRATEGIES
                    },
                }
            )
        write_csv(out / "grid.csv", grid_rows)
        names += plots.grid_heatmaps(grid_rows, out, "measured")
        names.append(plots.overhead_heatmap(grid_rows, out))
        sim_dir = Path(args.sim_grid) if args.sim_grid else None
        if sim_dir is not None and (sim_dir / "grid.csv").exists():
            from dsi.tools.experiments.simulate import read_csv

            names.append(plots.side_by_side(read_csv(sim_dir / "grid.csv"), grid_rows, out))
        else:
            sim_rows = [
                {
                    "drafter_fraction": e["sweep_drafter_fraction"],
                    "acceptance": e["sweep_acceptance"],
                    "dsi_over_si": e["dsi_over_si_simulated"],
                    "dsi_over_nonsi": e["dsi_over_nonsi_simulated"],
                    "si_over_nonsi": e["si_over_nonsi_simulated"],
                }
                for e in speedups
            ]
            names.append(plots.side_by_side(sim_rows, grid_rows, out))
    else:
        names.append(plots.profile_bars(speedups, out))
    return names


def _load_csv(path: Path) -> list[dict]:
    from dsi.tools.experiments.simulate import read_csv

    def conv(v: str) -> Any:
        if v in ("True", "False"):
            return v == "True"
        try:
            return float(v)
        except ValueError:
            return v

    return [{k: conv(v) for k, v in r.items()} for r in read_csv(path)] if path.exists() else []


def replot(args: argparse.Namespace) -> int:
    """Redraw the plots of an earlier run from its CSV files."""
    out = Path(args.replot)
    meta = json.loads((out / "results.json").read_text())["meta"] if (out / "results.json").exists() else {}
    args.grid = "grid" in meta
    names = _plots(
        out, _load_csv(out / "runs.csv"), _load_csv(out / "summary.csv"), _load_csv(out / "speedups.csv"), args
    )
    print(f"redrawn in {out}: {', '.join(names)}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    from dsi.tools.experiments.config import ConfigError

    if args.replot:
        return replot(args)
    if args.load:
        return load.main(args)
    args._argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else []
    try:
        return asyncio.run(amain(args))
    except ConfigError as exc:
        print(f"dsi bench: {exc}", file=sys.stderr)
        return 2
