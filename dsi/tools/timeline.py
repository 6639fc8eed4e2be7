"""Draw the schedule of one generation (``dsi generate --timeline FILE``).

Two files from one :class:`~dsi.domain.timeline.Timeline`:

* ``FILE.json``: Chrome trace-event JSON (open it in https://ui.perfetto.dev
  or chrome://tracing). One process "coordinator"; one thread (lane) for the
  drafter and one per target replica (plus "queued" lanes where a replica had
  two requests at once); a "commits" lane with an instant event per token
  (rejections named as such) and a counter of committed tokens.
* ``FILE.png`` (matplotlib, the ``experiments`` extra): the same lanes,
  verifications coloured by outcome, draft chunks on the drafter lane, and
  below, committed positions over time with every rejection marked.

docs/architecture.md#reading-a-timeline explains how to read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsi.domain.timeline import OUTCOMES, Timeline, VerificationSpan

#: PNG colour of each outcome, and the Chrome trace viewer's reserved colour name for it.
COLOURS = {
    "decided": "#2ca02c",
    "useless": "#9e9e9e",
    "stale": "#d62728",
    "preempted": "#ff7f0e",
    "failed": "#000000",
    "abandoned": "#c5b0d5",
}
CHROME_COLOURS = {
    "decided": "good",
    "useless": "grey",
    "stale": "terrible",
    "preempted": "yellow",
    "failed": "black",
    "abandoned": "generic_work",
}
DRAFT_COLOUR = "#1f77b4"
PID = 1


def paths(file: str | Path) -> tuple[Path, Path]:
    """``FILE`` → (``FILE.json``, ``FILE.png``); a .json or .png suffix is
    taken off first, so either name gives both files."""
    p = Path(file)
    if p.suffix.lower() in (".json", ".png"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".png")


def _busy_until(v: VerificationSpan) -> float:
    """When the replica was done with it: its result arrived, or it stopped mattering."""
    return v.completed if v.completed is not None else v.ended


def replica_lanes(t: Timeline) -> list[tuple[str, list[VerificationSpan]]]:
    """One lane per target replica; a verification that overlaps another on
    the same replica (queued behind it) goes to a further lane of that replica."""
    lanes: list[tuple[str, list[VerificationSpan]]] = []
    for i, name in enumerate(t.targets):
        sub: list[list[VerificationSpan]] = []
        for v in sorted((v for v in t.verifications if v.target == i), key=lambda v: v.sent):
            for lane in sub:
                if _busy_until(lane[-1]) <= v.sent:
                    lane.append(v)
                    break
            else:
                sub.append([v])
        for k, lane in enumerate(sub or [[]]):
            lanes.append((name if k == 0 else f"{name} (queued {k})", lane))
    return lanes


def _label(v: VerificationSpan) -> str:
    span = f"{v.base}" if v.drafts == 0 else f"{v.base}-{v.end_position}"
    return f"{'F ' if v.frontier else ''}{span}"


# --- Chrome trace-event JSON -------------------------------------------------------------------


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def chrome_trace(t: Timeline) -> dict[str, Any]:
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": f"dsi {t.strategy} generation"}}
    ]

    def lane(tid: int, name: str) -> None:
        events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": name}})
        events.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})

    tid = 0
    for d, name in enumerate(t.drafters):
        tid += 1
        lane(tid, name)
        for s in (s for s in t.draft_streams if s.drafter == d):
            events.append(
                {
                    "ph": "X",
                    "pid": PID,
                    "tid": tid,
                    "name": f"draft stream {s.id} from {s.start}",
                    "cat": "draft",
                    "ts": _us(s.opened),
                    "dur": _us(max(s.ended - s.opened, 0.0)),
                    "args": {"start": s.start, "cancelled": s.cancelled},
                }
            )
            previous = s.opened
            for c in (c for c in t.draft_chunks if c.stream == s.id):
                events.append(
                    {
                        "ph": "X",
                        "pid": PID,
                        "tid": tid,
                        "name": f"chunk {c.start}-{c.start + c.tokens - 1}",
                        "cat": "draft",
                        "ts": _us(previous),
                        "dur": _us(max(c.received - previous, 0.0)),
                        "args": {"start": c.start, "tokens": c.tokens},
                    }
                )
                previous = c.received
    for name, verifications in replica_lanes(t):
        tid += 1
        lane(tid, name)
        for v in verifications:
            args: dict[str, Any] = {
                "id": v.id,
                "base": v.base,
                "drafts": v.drafts,
                "frontier": v.frontier,
                "outcome": v.outcome,
                "accepted": v.accepted,
                "sent_ms": round(v.sent * 1e3, 3),
                "completed_ms": None if v.completed is None else round(v.completed * 1e3, 3),
                "ended_ms": round(v.ended * 1e3, 3),
            }
            events.append(
                {
                    "ph": "X",
                    "pid": PID,
                    "tid": tid,
                    "name": f"verify {_label(v)}: {v.outcome}",
                    "cat": v.outcome or "verify",
                    "ts": _us(v.sent),
                    "dur": _us(max(_busy_until(v) - v.sent, 0.0)),
                    "cname": CHROME_COLOURS.get(v.outcome, "generic_work"),
                    "args": args,
                }
            )
    tid += 1
    lane(tid, "commits")
    for n, c in enumerate(t.commits, start=1):
        kind = "rejected" if c.rejected else ("accepted" if c.draft_token_id is not None else "plain")
        events.append(
            {
                "ph": "i",
                "s": "t",
                "pid": PID,
                "tid": tid,
                "name": f"{kind} {c.position}" if kind != "rejected" else f"REJECTED {c.position}",
                "cat": kind,
                "ts": _us(c.at),
                "cname": "terrible" if c.rejected else ("good" if kind == "accepted" else "grey"),
                "args": {"position": c.position, "token_id": c.token_id, "draft_token_id": c.draft_token_id},
            }
        )
        events.append({"ph": "C", "pid": PID, "name": "committed tokens", "ts": _us(c.at), "args": {"tokens": n}})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "strategy": t.strategy,
            "prompt_tokens": t.prompt_tokens,
            "wall_seconds": t.wall_seconds,
            "outcomes": t.outcome_counts(),
        },
    }


# --- PNG ---------------------------------------------------------------------------------------


def summary(t: Timeline) -> str:
    counts = {k: n for k, n in t.outcome_counts().items() if n}
    decided = [c for c in t.commits if c.draft_token_id is not None]
    accepted = sum(not c.rejected for c in decided)
    rate = f", acceptance {accepted / len(decided):.2f}" if decided else ""
    outcomes = ", ".join(f"{n} {k}" for k, n in counts.items())
    return (
        f"{t.strategy.upper()}: {len(t.commits)} tokens in {t.wall_seconds * 1e3:.0f} ms on {len(t.targets)}"
        f" replica(s){rate}; {len(t.verifications)} verifications ({outcomes})"
    )


def draw_png(t: Timeline, path: Path, title: str | None = None, xmax: float | None = None) -> Path:
    """The timeline as a PNG. ``xmax`` (ms) fixes the time axis, to compare
    two timelines drawn at the same scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lanes = replica_lanes(t)
    names = [*t.drafters, *(n for n, _ in lanes)]
    height = 1.6 + 0.42 * len(names) + 1.6
    fig, (ax, bottom) = plt.subplots(
        2,
        1,
        figsize=(12, height),
        sharex=True,
        gridspec_kw={"height_ratios": [max(len(names), 1) * 0.42, 1.6]},
        constrained_layout=True,
    )
    ms = 1e3
    width = xmax if xmax is not None else max(t.wall_seconds * ms, 1.0)
    stream_drafter = {s.id: s.drafter for s in t.draft_streams}
    y = {name: len(names) - 1 - i for i, name in enumerate(names)}
    for d, name in enumerate(t.drafters):
        row = y[name]
        for s in (s for s in t.draft_streams if s.drafter == d):
            ax.broken_barh(
                [(s.opened * ms, max(s.ended - s.opened, 0) * ms)],
                (row - 0.3, 0.6),
                facecolors="none",
                edgecolors=DRAFT_COLOUR,
                linewidth=0.8,
                linestyles="--" if s.cancelled else "-",
            )
        for c in (c for c in t.draft_chunks if stream_drafter.get(c.stream) == d):
            ax.plot([c.received * ms], [row], marker="|", color=DRAFT_COLOUR, markersize=9)
    for name, verifications in lanes:
        row = y[name]
        for v in verifications:
            colour = COLOURS.get(v.outcome, "#bbbbbb")
            busy = (_busy_until(v) - v.sent) * ms
            ax.broken_barh(
                [(v.sent * ms, max(busy, 0.05))],
                (row - 0.35, 0.7),
                facecolors=colour,
                edgecolors="white" if not v.frontier else "black",
                linewidth=0.6 if not v.frontier else 1.0,
            )
            if v.completed is not None and v.ended > v.completed:  # result in, waiting for the frontier
                ax.plot([v.completed * ms, v.ended * ms], [row, row], color=colour, linewidth=1, alpha=0.6)
            if busy / width > 0.03:  # wide enough for its positions
                ax.text(
                    (v.sent * ms) + busy / 2,
                    row,
                    _label(v),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v.outcome in ("decided", "stale", "failed") else "black",
                    clip_on=True,
                )
    ax.set_yticks([y[n] for n in names], names, fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=COLOURS[o], label=o) for o in OUTCOMES if t.outcome_counts()[o]]
    handles.append(Patch(facecolor="none", edgecolor="black", label="frontier step (black edge)"))
    handles.append(Patch(facecolor="none", edgecolor=DRAFT_COLOUR, label="draft stream (| = chunk)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or summary(t), fontsize=10, loc="left")

    # Committed positions over time; rejections marked.
    if t.commits:
        xs = [c.at * ms for c in t.commits]
        ys = [c.position - t.prompt_tokens + 1 for c in t.commits]
        bottom.step(xs, ys, where="post", color="black", linewidth=1)
        rej = [(c.at * ms, c.position - t.prompt_tokens + 1) for c in t.commits if c.rejected]
        if rej:
            bottom.scatter(*zip(*rej, strict=True), marker="x", color=COLOURS["stale"], zorder=3, label="rejection")
            bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    bottom.set_ylabel("tokens\ncommitted", fontsize=8)
    bottom.set_xlabel("ms since the generation started (coordinator clock)")
    bottom.grid(alpha=0.3)
    bottom.set_xlim(0, width)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(t: Timeline, file: str | Path, png: bool = True, title: str | None = None) -> list[Path]:
    """Write ``FILE.json`` and, with matplotlib and ``png``, ``FILE.png``.
    Returns the paths written."""
    json_path, png_path = paths(file)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(chrome_trace(t)))
    written = [json_path]
    if png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return written
        written.append(draw_png(t, png_path, title))
    return written
