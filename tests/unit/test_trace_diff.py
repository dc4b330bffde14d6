"""`trace diff`: stage-by-stage profiles of two sets of traces, the changes between them and the hints."""

from __future__ import annotations

import itertools
import json

from blockpress.runtime.tracing.diff import DECODER, SAMPLER, hints, profile, render_diff
from blockpress.runtime.tracing.export import to_chrome
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.store import SpanEventRecord, SpanRecord

MS = 1_000_000
_ids = itertools.count(1)


def job(*, wait_ms: float, turns: int, prefill_ms: float, prompt: int, prefilled: int, steps: int,
        max_steps: int = 8, step_ms: float = 2.0, decoder_ms: float = 1.5) -> list[SpanRecord]:  # fmt: skip
    """One job's spans laid end to end: queue wait, then per turn a prefill and one canvas."""
    trace_id = f"{next(_ids):032x}"
    spans: list[SpanRecord] = []

    def add(name: str, parent: str | None, start: float, end: float, attrs: dict, events=()) -> str:
        span_id = f"{next(_ids):016x}"
        spans.append(SpanRecord(trace_id, span_id, parent, name, int(start * MS), int(end * MS),
                                attributes=attrs, events=list(events)))  # fmt: skip
        return span_id

    def step(n: int) -> dict:
        return {Attr.STEP: n, Attr.STEP_MS: step_ms, Attr.DECODER_MS: decoder_ms,
                Attr.SAMPLER_MS: step_ms - decoder_ms, Attr.ACCEPTED: 4}  # fmt: skip

    t = wait_ms
    run_children: list[tuple[str, float, float, dict, list]] = []
    for turn in range(turns):
        run_children.append((SpanName.ENGINE_PREFILL, t, t + prefill_ms,
                             {Attr.GEN_AI_INPUT_TOKENS: prompt, Attr.PREFILL_TOKENS: prefilled}, []))  # fmt: skip
        t += prefill_ms
        events = [
            SpanEventRecord(SpanName.STEP_EVENT, int((t + (i + 1) * step_ms) * MS), step(i + 1)) for i in range(steps)
        ]
        attrs = {Attr.CANVAS_INDEX: turn, Attr.CANVAS_STEPS: steps, Attr.CANVAS_MAX_STEPS: max_steps}
        run_children.append((SpanName.ENGINE_CANVAS, t, t + steps * step_ms, attrs, events))
        t += steps * step_ms
    root = add(SpanName.gateway("Generate"), None, 0, t, {Attr.JOB_ID: trace_id})
    add(SpanName.QUEUE_WAIT, root, 0, wait_ms, {})
    run = add(SpanName.REPLICA_RUN, root, wait_ms, t, {})
    for name, start, end, attrs, events in run_children:
        add(name, run, start, end, attrs, events)
    return spans


def test_profile_splits_job_time_into_stages_that_add_up():
    p = profile([job(wait_ms=10, turns=1, prefill_ms=4, prompt=100, prefilled=100, steps=3)])
    assert p.jobs == 1 and p.job_ms == 10 + 4 + 6
    assert p.stage_ms[SpanName.QUEUE_WAIT] == 10 and p.stage_ms[SpanName.ENGINE_PREFILL] == 4
    assert p.stage_ms[SpanName.ENGINE_CANVAS] == 6
    assert p.stage_ms[DECODER] == 4.5 and p.stage_ms[SAMPLER] == 1.5
    top = [s for s in p.stage_ms if "/" not in s]
    assert sum(p.stage_ms[s] for s in top) == p.job_ms
    assert p.share(SpanName.QUEUE_WAIT) == 0.5


def test_diff_says_which_stage_got_faster_by_how_much_with_its_share():
    before = [job(wait_ms=40, turns=1, prefill_ms=4, prompt=100, prefilled=100, steps=8, decoder_ms=1.5)]
    after = [job(wait_ms=40, turns=1, prefill_ms=4, prompt=100, prefilled=100, steps=4, decoder_ms=1.5)]
    text = render_diff(profile(before), profile(after), ("before", "after"))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    canvas = rows[SpanName.ENGINE_CANVAS]
    assert canvas[1:5] == ["16.0", "27%", "8.0", "15%"] and canvas[5:] == ["-8.0", "-50%", "faster"]
    assert rows[SpanName.QUEUE_WAIT][-1] == "same"
    assert rows["decoder"][1] == "12.0" and rows["decoder"][3] == "6.0"
    assert rows["job"][1:] == ["60.0", "52.0", "-8.0", "-13%", "faster"]
    assert "largest change: engine.canvas/decoder -6.0 ms per job (faster in B)" in text
    assert "8/8" not in text and "at step limit" in text


def test_hints_name_prefill_without_a_session_and_canvases_at_the_step_limit():
    no_session = profile([job(wait_ms=1, turns=4, prefill_ms=30, prompt=3000, prefilled=3000, steps=8)])
    [prefill_hint, limit_hint] = hints(no_session)
    assert "re-encodes its whole prompt (3000 of 3000 tokens)" in prefill_hint and "session" in prefill_hint
    assert "4 of 4 canvases ran to the step limit (8 steps)" in limit_hint
    warm = profile([job(wait_ms=1, turns=4, prefill_ms=30, prompt=3000, prefilled=200, steps=3)])
    assert not any("session" in h for h in hints(warm)), "a warm session is no reason to suggest one"
    assert not any("step limit" in h for h in hints(warm))


def test_chrome_export_nests_steps_and_their_parts_inside_the_canvas():
    spans = job(wait_ms=5, turns=1, prefill_ms=2, prompt=10, prefilled=10, steps=2)
    doc = json.loads(to_chrome(spans))
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    by_name = {e["name"]: e for e in slices}
    canvas = by_name[f"{SpanName.ENGINE_CANVAS} #0"]
    assert canvas["ts"] == 7000 and canvas["dur"] == 4000 and canvas["args"][Attr.CANVAS_STEPS] == 2
    steps = [e for e in slices if e["name"].startswith("step ")]
    parts = [e for e in slices if e["name"] in ("decoder", "sampler")]
    assert [(s["ts"], s["dur"]) for s in steps] == [(7000, 2000), (9000, 2000)]
    assert [(p["name"], p["ts"], p["dur"]) for p in parts[:2]] == [("decoder", 7000, 1500), ("sampler", 8500, 500)]
    assert all(e["tid"] == canvas["tid"] for e in steps + parts)
    threads = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert {"gateway", "queue", "replica", "engine"} <= threads
    assert len({e["tid"] for e in slices if e["name"].startswith(("gateway", "queue", "replica"))}) == 3


def properly_nested(doc: dict) -> bool:
    """On every track, two slices either nest or do not overlap: what trace viewers require."""
    tracks: dict[int, list[tuple[float, float]]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            tracks.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for slices in tracks.values():
        open_: list[float] = []
        for begin, end in sorted(slices, key=lambda s: (s[0], -s[1])):
            while open_ and open_[-1] <= begin + 1e-6:  # ts + dur in float µs carries 1e-12 noise
                open_.pop()
            if open_ and end > open_[-1] + 1e-6:
                return False
            open_.append(end)
    return True


def test_chrome_slices_nest_on_every_track_even_at_epoch_nanosecond_times():
    # Real epoch times: a float nanosecond there is only good to 256 ns, enough to break nesting.
    spans = job(wait_ms=5, turns=2, prefill_ms=2.000123, prompt=10, prefilled=10, steps=3, step_ms=1.234567)
    epoch = 1_796_116_209_458_773_358

    def moved(s: SpanRecord) -> SpanRecord:
        events = [SpanEventRecord(e.name, e.time_ns + epoch, e.attributes) for e in s.events]
        return SpanRecord(s.trace_id, s.span_id, s.parent_id, s.name, s.start_ns + epoch, s.end_ns + epoch,
                          attributes=s.attributes, events=events)  # fmt: skip

    shifted = [moved(s) for s in spans]
    doc = json.loads(to_chrome(shifted))
    assert properly_nested(doc)
    assert sum(e["name"].startswith("step ") for e in doc["traceEvents"]) == 6
