"""Plots for ``dsi simulate`` and ``dsi bench`` (matplotlib, Agg backend).

Latency ratios are drawn on a diverging scale centred at 1: cells below 1
(the numerator is faster) are green, cells above 1 red, with a black contour
where the ratio crosses 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm

from dsi.tools.experiments.simulate import RATIOS

CMAP = "RdYlGn_r"  # low (faster) = green, 1 = yellow, high (slower) = red
DPI = 90


def _mesh(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fracs = sorted({float(r["drafter_fraction"]) for r in rows})
    accs = sorted({float(r["acceptance"]) for r in rows})
    fi = {f: i for i, f in enumerate(fracs)}
    ai = {a: i for i, a in enumerate(accs)}
    z = np.full((len(accs), len(fracs)), np.nan)
    for r in rows:
        z[ai[float(r["acceptance"])], fi[float(r["drafter_fraction"])]] = float(r[key])
    return np.array(fracs), np.array(accs), z


def _edges(x: np.ndarray) -> np.ndarray:
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _norm(z: np.ndarray) -> TwoSlopeNorm:
    """Centred at 1 and about symmetric in log scale (a ratio of 1.02 stays
    near the centre colour even when every other cell is below 1)."""
    lo = float(np.nanmin(z)) if np.isfinite(z).any() else 0.5
    hi = float(np.nanmax(z)) if np.isfinite(z).any() else 1.5
    vmin = min(lo, max(1 / max(hi, 1e-9), 0.5), 0.99)
    vmax = max(hi, min(1 / max(lo, 1e-9), 2.0), 1.01)
    return TwoSlopeNorm(vcenter=1.0, vmin=vmin, vmax=vmax)


def _panel(ax, rows: Sequence[Mapping], key: str, title: str, norm: TwoSlopeNorm | None = None):
    x, y, z = _mesh(rows, key)
    norm = norm or _norm(z)
    mesh = ax.pcolormesh(_edges(x), _edges(y), z, cmap=CMAP, norm=norm, shading="flat")
    if len(x) > 1 and len(y) > 1 and np.nanmin(z) < 1 < np.nanmax(z):
        ax.contour(x, y, z, levels=[1.0], colors="black", linewidths=0.8)
    below = np.nanmean(z < 1.0) * 100
    ax.set_title(f"{title}\nmin {np.nanmin(z):.2f}, max {np.nanmax(z):.2f}, {below:.0f}% of cells < 1", fontsize=9)
    ax.set_xlabel("drafter latency / target latency")
    ax.set_ylabel("acceptance rate")
    return mesh


def grid_heatmaps(rows: Sequence[Mapping], out: Path, label: str, meta: Mapping | None = None) -> list[str]:
    """One 2x2 figure of the four ratios (``grid.png``)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.4), layout="constrained")
    for ax, (key, title) in zip(axes.flat, RATIOS.items(), strict=True):
        mesh = _panel(ax, rows, key, f"{title} ({label})")
        fig.colorbar(mesh, ax=ax, label="latency ratio (< 1: left side faster)")
    if meta:
        fig.suptitle(_caption(meta), fontsize=9)
    name = "grid.png"
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return [name]


def _caption(meta: Mapping) -> str:
    cfg = meta.get("config", {})
    targets = cfg.get("targets") or [{}]
    t = targets[0]
    ks = meta.get("lookaheads", [])
    k = f"lookahead best of {ks}" if len(ks) > 1 else f"lookahead {ks[0] if ks else cfg.get('lookahead')}"
    return (
        f"target TTFT {t.get('ttft_ms', 0):g} ms, TPOT {t.get('tpot_ms', 0):g} ms; SP degree {len(targets)}; {k}; "
        f"{cfg.get('tokens')} tokens; {meta.get('repeats')} repeats"
    )


def side_by_side(
    sim_rows: Sequence[Mapping], bench_rows: Sequence[Mapping], out: Path, name: str = "grid_compare.png"
) -> str:
    """Simulated vs measured heatmaps of DSI/SI and DSI/non-SI on one colour
    scale, plus measured/simulated DSI latency."""
    keys = ["dsi_over_si", "dsi_over_nonsi", "si_over_nonsi"]
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 4.4 * len(keys)), layout="constrained")
    for row, key in enumerate(keys):
        zs = [_mesh(sim_rows, key)[2], _mesh(bench_rows, key)[2]]
        norm = _norm(np.concatenate([z.ravel() for z in zs]))
        for col, (rows, label) in enumerate(((sim_rows, "simulated"), (bench_rows, "measured"))):
            mesh = _panel(axes[row, col], rows, key, f"{RATIOS[key]} ({label})", norm)
        fig.colorbar(mesh, ax=axes[row, :].tolist(), label="latency ratio")
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def overhead_heatmap(rows: Sequence[Mapping], out: Path, name: str = "grid_overhead.png") -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for ax, s in zip(axes, ("nonsi", "si", "dsi"), strict=True):
        key = f"{s}_overhead"
        x, y, z = _mesh(rows, key)
        mesh = ax.pcolormesh(_edges(x), _edges(y), z, cmap="viridis", shading="flat")
        ax.set_title(f"{s}: measured / simulated latency\nmedian {np.nanmedian(z):.3f}", fontsize=9)
        ax.set_xlabel("drafter latency / target latency")
        ax.set_ylabel("acceptance rate")
        fig.colorbar(mesh, ax=ax)
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def profile_bars(rows: Sequence[Mapping], out: Path, name: str = "speedups.png") -> str:
    """Per profile: DSI/SI and DSI/non-SI latency ratios, measured and simulated."""
    labels = [str(r["profile"]) for r in rows]
    series = [
        ("dsi_over_si_measured", "DSI/SI measured", "#1b7837"),
        ("dsi_over_si_simulated", "DSI/SI simulated", "#a6dba0"),
        ("dsi_over_nonsi_measured", "DSI/non-SI measured", "#2166ac"),
        ("dsi_over_nonsi_simulated", "DSI/non-SI simulated", "#92c5de"),
        ("si_over_nonsi_measured", "SI/non-SI measured", "#b2182b"),
        ("si_over_nonsi_simulated", "SI/non-SI simulated", "#f4a582"),
    ]
    x = np.arange(len(labels))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2), 4.5))
    for i, (key, label, color) in enumerate(series):
        vals = [float(r.get(key, np.nan)) for r in rows]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=label, color=color)
    ax.axhline(1.0, color="black", linewidth=0.8)
    top = np.nanmax([float(r.get(key, np.nan)) for r in rows for key, _, _ in series] + [1.0])
    ax.set_ylim(0, max(1.35, 1.2 * top))
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("latency ratio (< 1: left strategy faster)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def latency_boxes(
    runs: Sequence[Mapping], out: Path, summary: Sequence[Mapping] = (), name: str = "latency.png"
) -> str:
    """Per point (profile and sweep values) and strategy: the spread of
    measured ms per token, and the simulated mean (red x) where there is one."""
    profiles = list(dict.fromkeys(str(r["point"]) for r in runs))
    strategies = list(dict.fromkeys(str(r["strategy"]) for r in runs))
    fig, axes = plt.subplots(1, len(profiles), figsize=(max(4.0, 2.6 * len(profiles)), 3.6), squeeze=False)
    for ax, prof in zip(axes[0], profiles, strict=True):
        data = [
            [float(r["ms_per_token"]) for r in runs if r["point"] == prof and r["strategy"] == s] for s in strategies
        ]
        ax.boxplot(data, tick_labels=strategies)
        for i, s in enumerate(strategies, start=1):
            for srow in summary:
                if srow["point"] == prof and srow["strategy"] == s and float(srow["tokens"] or 0) > 0:
                    sim = float(srow["simulated_latency_ms"]) / float(srow["tokens"])
                    if np.isfinite(sim):
                        ax.plot([i], [sim], "x", color="red", markersize=8, label="simulated" if i == 1 else None)
        ax.set_title(prof, fontsize=8)
        ax.set_ylabel("ms per token")
        ax.tick_params(labelsize=7)
    fig.suptitle("boxes: measured ms per token; red x: simulated mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name
