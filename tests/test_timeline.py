"""The schedule of one generation: recorded by the coordinator, sent on request
(GenerateRequest.timeline), drawn as Chrome trace-event JSON and a PNG."""

from __future__ import annotations

import json

import pytest

from dsi.domain.timeline import OUTCOMES, CommitMark, Timeline, VerificationSpan
from dsi.tools import timeline as draw
from dsi.wire import convert
from dsi.wire.client import Client, request
from services.coordinator.coordinator import GenerateInput
from services.coordinator.engine import GenerationParams, Strategy
from services.coordinator.timeline import TimelineRecorder
from tests.helpers import local_cluster, make_engine

T_SPEC = "synthetic:vocab=300,seed=9,tpot_ms=3"
D_SPEC = "synthetic:vocab=300,seed=9,tpot_ms=0.5,acceptance=0.7"
PROMPT = [1, 2, 3]


async def recorded(strategy: Strategy, replicas: int = 4, tokens: int = 40):
    engine = make_engine(T_SPEC, D_SPEC, replicas)
    rec = TimelineRecorder(strategy.value, len(PROMPT))
    gen = engine.generate(PROMPT, GenerationParams(tokens, strategy=strategy, lookahead=3), observer=rec)
    out = [t async for toks in gen.tokens() for t in toks]
    return rec.finish(), gen, out


@pytest.mark.parametrize("strategy", list(Strategy))
async def test_the_timeline_accounts_for_every_verification_stream_and_commit(strategy):
    t, gen, out = await recorded(strategy)
    st = gen.stats
    assert len(t.verifications) == st.verifications_started
    assert all(v.outcome in OUTCOMES for v in t.verifications), "every verification ended with an outcome"
    assert sum(v.completed is not None for v in t.verifications) == st.target_forward_passes
    for v in t.verifications:
        assert 0 <= v.sent <= v.ended <= t.wall_seconds
        assert v.completed is None or v.sent <= v.completed <= v.ended
        assert (v.accepted is not None) == (v.completed is not None)
    assert [(c.position, c.token_id) for c in t.commits] == list(enumerate(out, start=len(PROMPT)))
    assert [c.at for c in t.commits] == sorted(c.at for c in t.commits)
    decided = [c for c in t.commits if c.draft_token_id is not None]
    assert len(decided) == st.decided_drafts
    assert sum(c.rejected for c in decided) == st.decided_drafts - st.accepted_tokens
    assert len(t.draft_streams) == st.draft_streams
    assert sum(c.tokens for c in t.draft_chunks) == st.drafted_tokens
    assert all(s.opened <= s.ended for s in t.draft_streams)
    if strategy is Strategy.NONSI:
        assert not t.drafters and len(t.targets) == 1
    else:
        assert len(t.drafters) == 1
    assert all(0 <= v.target < len(t.targets) for v in t.verifications)
    if strategy is Strategy.DSI:  # how much speculation happens depends on timing; what it decided does not
        assert "decided" in {v.outcome for v in t.verifications}
    else:
        assert all(v.frontier and v.outcome == "decided" for v in t.verifications)


async def test_the_timeline_survives_the_wire():
    t, _, _ = await recorded(Strategy.DSI)
    back = convert.timeline_from_pb(convert.timeline_to_pb(t))
    assert back == t
    assert back.verifications and back.commits and back.draft_chunks


async def test_the_coordinator_sends_it_only_when_asked():
    async with local_cluster([T_SPEC] * 3, [D_SPEC], serve_coordinator=True) as cl:
        async with Client(cl.coordinator_address) as client:
            plain = await client.generate(request(prompt_ids=PROMPT, max_new_tokens=12, strategy="dsi"))
            asked = await client.generate(request(prompt_ids=PROMPT, max_new_tokens=12, strategy="dsi", timeline=True))
    assert plain.timeline is None
    t = asked.timeline
    assert t is not None and t.strategy == "dsi" and t.prompt_tokens == len(PROMPT)
    assert [c.token_id for c in t.commits] == asked.token_ids == plain.token_ids
    assert len(t.verifications) == asked.stats["verifications_started"]
    assert set(t.targets) <= {f"target {a.address}" for a in cl.targets}
    assert t.wall_seconds > 0


async def test_a_stop_string_ends_the_timeline_too():
    async with local_cluster([T_SPEC] * 2, [D_SPEC]) as cl:
        first = [o async for o in cl.coordinator.generate(GenerateInput(prompt_token_ids=PROMPT, max_new_tokens=20))]
        ids = [t for o in first for t in o.token_ids]
        stop = " ".join(str(i) for i in ids[4:6])  # synthetic text: ids joined by spaces
        req = GenerateInput(prompt_token_ids=PROMPT, max_new_tokens=20, stop=[stop], timeline=True)
        outs = [o async for o in cl.coordinator.generate(req)]
    t = outs[-1].timeline
    assert outs[-1].finish_reason is not None and outs[-1].finish_reason.value == "stop"
    assert t is not None and all(v.outcome in OUTCOMES for v in t.verifications)
    assert all(s.ended >= s.opened for s in t.draft_streams)


def test_overlapping_verifications_of_one_replica_get_their_own_lane():
    t = Timeline("dsi", 3, targets=["target a", "target b"])
    t.verifications = [
        VerificationSpan(0, 0, 3, 0, True, sent=0.0, ended=0.010, completed=0.010, accepted=0, outcome="decided"),
        VerificationSpan(1, 0, 4, 3, False, sent=0.002, ended=0.004, outcome="stale"),  # queued behind 0
        VerificationSpan(2, 0, 8, 0, True, sent=0.010, ended=0.02, completed=0.02, accepted=0, outcome="decided"),
        VerificationSpan(3, 1, 4, 3, False, sent=0.001, ended=0.03, completed=0.005, accepted=3, outcome="useless"),
    ]
    lanes = dict(draw.replica_lanes(t))
    assert [v.id for v in lanes["target a"]] == [0, 2]
    assert [v.id for v in lanes["target a (queued 1)"]] == [1]
    assert [v.id for v in lanes["target b"]] == [3]


async def test_chrome_trace_and_png(tmp_path):
    t, gen, _ = await recorded(Strategy.DSI)
    written = draw.write(t, tmp_path / "gen.png")  # either suffix names both files
    assert written == [tmp_path / "gen.json", tmp_path / "gen.png"]
    trace = json.loads((tmp_path / "gen.json").read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert set(t.targets) <= names and set(t.drafters) <= names and "commits" in names
    verifies = [e for e in events if e["ph"] == "X" and e["name"].startswith("verify ")]
    assert len(verifies) == len(t.verifications)
    assert {e["cat"] for e in verifies} == {v.outcome for v in t.verifications}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events if e["ph"] == "X")
    commits = [e for e in events if e["ph"] == "i"]
    assert len(commits) == len(t.commits)
    rejected = [e for e in commits if e["name"].startswith("REJECTED")]
    assert len(rejected) == gen.stats.decided_drafts - gen.stats.accepted_tokens
    counter = [e for e in events if e["ph"] == "C"]
    assert counter[-1]["args"]["tokens"] == len(t.commits)
    # Nesting within a lane: slices of one thread never partly overlap (Chrome's X events must nest).
    by_tid: dict[int, list] = {}
    for e in events:
        if e["ph"] == "X":
            by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for slices in by_tid.values():
        open_ends: list[float] = []
        for start, end in sorted(slices, key=lambda se: (se[0], -se[1])):
            while open_ends and open_ends[-1] <= start + 0.5:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 0.5, "partial overlap in one lane"
            open_ends.append(end)
    png = (tmp_path / "gen.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_summary_line():
    t = Timeline("si", 2, targets=["t"], drafters=["d"], wall_seconds=0.5)
    t.commits = [CommitMark(2, 7, 7, 0.1), CommitMark(3, 8, 9, 0.2), CommitMark(4, 1, None, 0.3)]
    t.verifications = [VerificationSpan(0, 0, 2, 2, True, 0.0, 0.2, 0.2, 1, "decided")]
    assert draw.summary(t) == ("SI: 3 tokens in 500 ms on 1 replica(s), acceptance 0.50; 1 verifications (1 decided)")


def test_timeline_gaps_measure_each_span_against_the_models_latency() -> None:
    """tools/timeline_gaps.py (docs/benchmarks.md section 13): how much longer
    than the model each kind of span took, read off a timeline."""
    from dsi.domain.timeline import CommitMark, DraftChunkMark, DraftStreamSpan, Timeline, VerificationSpan
    from tools.timeline_gaps import gaps

    tl = Timeline("dsi", 4)
    tl.verifications = [
        VerificationSpan(0, 0, 0, 3, True, sent=0.010, completed=0.042, accepted=1, outcome="decided"),
        VerificationSpan(1, 1, 4, 3, False, sent=0.020, outcome="stale"),  # cancelled: no result
    ]
    tl.draft_streams = [DraftStreamSpan(0, 0, 0, opened=0.0), DraftStreamSpan(1, 0, 2, opened=0.0425)]
    tl.draft_chunks = [
        DraftChunkMark(0, 0, 3, received=0.0100),
        DraftChunkMark(0, 3, 3, received=0.0195),
        DraftChunkMark(1, 2, 3, received=0.0545),
    ]
    tl.commits = [CommitMark(0, 7, 7, 0.042), CommitMark(1, 8, 9, 0.042)]  # the second one a rejection
    found = gaps(tl, target_ms=30.0, drafter_ms=3.0)
    assert found["verification"] == pytest.approx([2.0])  # 32 ms for a 30 ms step
    assert found["first_chunk"] == pytest.approx([1.0, 3.0])  # 10 and 12 ms for 3 steps of 3 ms
    assert found["next_chunk"] == pytest.approx([0.5])
    assert found["restart"] == pytest.approx([0.5])
