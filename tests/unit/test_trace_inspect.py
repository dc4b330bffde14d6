"""The waterfall, JSON and HTML of one trace, and the figures across traces, on recorded span data."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from blockpress.runtime.cli.trace import parse_since
from blockpress.runtime.tracing.page import render_html
from blockpress.runtime.tracing.stats import Summary, render_comparison, render_summary, summarize
from blockpress.runtime.tracing.store import SpanEventRecord, SpanRecord
from blockpress.runtime.tracing.telemetry import Attr, SpanName
from blockpress.runtime.tracing.view import canvases, largest_stage, render_text, to_json

MS = 1_000_000


class _Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.n:016x}"


def job_trace(
    job: str,
    *,
    t0: int = 1_700_000_000 * 10**9,
    queue_ms: int = 20,
    prefill_ms: int = 10,
    canvases_: tuple[tuple[list[int], int, int], ...] = (([4, 12, 30], 5, 32), ([8, 30], 5, 7)),
    tool_ms: tuple[int, ...] = (),
    trace_n: int = 1,
) -> list[SpanRecord]:
    """A job-shaped trace as the runtime records it: gateway > queue.wait, replica.run > engine spans.

    `canvases_` holds (accepted per step, ms per step, tokens) per canvas. Times are exact, so the
    expected figures can be computed by hand.
    """
    ids = _Ids()
    trace_id = f"{trace_n:032x}"
    job_attr = {Attr.JOB_ID: job, Attr.GEN_AI_REQUEST_MODEL: "tiny"}
    root_id, run_id = ids(), ids()
    spans: list[SpanRecord] = []

    def add(name: str, span_id: str, parent: str | None, start: int, end: int, attrs: dict, events=()) -> None:
        spans.append(SpanRecord(trace_id, span_id, parent, name, start, end, attributes=attrs, events=list(events)))

    at = t0 + queue_ms * MS
    add(SpanName.QUEUE_WAIT, ids(), root_id, t0, at, job_attr)
    run_start = at
    add(SpanName.ENGINE_PREFILL, ids(), run_id, at, at + prefill_ms * MS, {})
    at += prefill_ms * MS
    for index, (accepted, step_ms, tokens) in enumerate(canvases_):
        steps = [
            SpanEventRecord(SpanName.STEP_EVENT, at + (i + 1) * step_ms * MS, {
                Attr.STEP: i, Attr.STEP_MS: float(step_ms), Attr.ACCEPTED: a, Attr.MEAN_ENTROPY: 1.0 / (i + 1)
            })
            for i, a in enumerate(accepted)
        ]  # fmt: skip
        end = at + len(accepted) * step_ms * MS
        attrs = {Attr.CANVAS_INDEX: index, Attr.CANVAS_STEPS: len(accepted), Attr.CANVAS_MAX_STEPS: 8}
        add(SpanName.ENGINE_CANVAS, ids(), run_id, at, end, {**attrs, Attr.CANVAS_TOKENS: tokens}, steps)
        at = end
    for n, ms in enumerate(tool_ms):
        add(SpanName.AGENT_TOOL, ids(), run_id, at, at + ms * MS, {Attr.GEN_AI_TOOL_NAME: f"t{n}"})
        at += ms * MS
    add(SpanName.REPLICA_RUN, run_id, root_id, run_start, at, job_attr)
    add(SpanName.gateway("Generate"), root_id, None, t0, at + MS, {**job_attr, Attr.RPC_SYSTEM: "grpc"})
    return spans


# ---- one trace -----------------------------------------------------------------------------------------


def test_waterfall_nests_spans_on_one_axis_and_names_the_largest_stage():
    spans = job_trace("job-1", queue_ms=20, prefill_ms=10)  # 20 + 10 + 15 + 10 ms, then 1 ms of reply
    text = render_text(spans, width=56)
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {1:032x}  job job-1  56.0 ms  6 spans")
    rows = {line.split()[0]: line for line in lines[2:8]}
    assert lines[2].startswith("gateway.Generate") and lines[3].startswith("  queue.wait")
    assert lines[4].startswith("  replica.run") and lines[5].startswith("    engine.prefill")
    assert lines[6].startswith("    engine.canvas #0") and lines[7].startswith("    engine.canvas #1")
    assert "100%" in rows["gateway.Generate"] and "36%" in rows["queue.wait"]
    # Bars sit on the shared axis: queue wait starts at 0, the replica's run after it (20 of 56 ms).
    bar = {name: row[row.index("│") + 1 : row.rindex("│")] for name, row in rows.items()}
    assert bar["queue.wait"].startswith("█") and not bar["replica.run"].startswith("█")
    assert bar["replica.run"].index("█") == int(20 / 56 * 56)
    assert lines[-1] == "largest stage: engine.canvas (2 spans), 25.0 ms, 45% of the job"


def test_canvas_table_shows_steps_against_the_limit_and_acceptance_growth():
    text = render_text(job_trace("job-1"))
    table = text.split("acceptance by step\n")[1].split("\n\n")[0].splitlines()
    assert re.match(r"\s+0\s+3/8\s+5\.00\s+32\s+\S+ 4 12 30$", table[0])
    assert re.match(r"\s+1\s+2/8\s+5\.00\s+7\s+\S+ 8 30$", table[1])
    views = canvases(job_trace("job-1"))
    assert [v.accepted for v in views] == [[4, 12, 30], [8, 30]]
    assert views[0].mean_entropy == pytest.approx([1.0, 0.5, 1 / 3])


def test_json_has_every_span_and_round_trips():
    spans = job_trace("job-1", tool_ms=(40,))
    doc = json.loads(to_json(spans))
    assert doc["job_id"] == "job-1" and doc["trace_id"] == f"{1:032x}"
    assert doc["largest_stage"]["name"] == SpanName.AGENT_TOOL
    assert sorted(SpanRecord.from_dict(d).span_id for d in doc["spans"]) == sorted(s.span_id for s in spans)
    canvas = next(d for d in doc["spans"] if d["name"] == SpanName.ENGINE_CANVAS)
    assert [e["attributes"][Attr.ACCEPTED] for e in canvas["events"]] == [4, 12, 30]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.span_ids: list[str] = []
        self.canvases: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-span-id" in a:
            self.span_ids.append(a["data-span-id"] or "")
        if "data-canvas" in a:
            self.canvases.append(a["data-canvas"] or "")
        if tag in ("link", "img", "iframe") or any(k in ("src", "href") for k in a):
            self.external.append(tag)


def test_html_is_one_self_contained_page_with_every_span_and_each_canvas_curve():
    spans = job_trace("job-<1>", tool_ms=(5,))
    page = render_html(spans)
    parsed = _Collect()
    parsed.feed(page)
    assert sorted(parsed.span_ids) == sorted(s.span_id for s in spans)
    assert parsed.canvases == ["0", "1"]
    assert parsed.external == [] and "http" not in page
    assert "job-&lt;1&gt;" in page and "job-<1>" not in page, "names are escaped"
    assert page.count("<polyline") == 4, "accepted and entropy for each of the two canvases"


def test_largest_stage_counts_self_time_not_parents_that_wrap_children():
    spans = job_trace("j", queue_ms=500)
    stage = largest_stage(spans)
    assert stage is not None and stage.name == SpanName.QUEUE_WAIT
    assert stage.seconds == pytest.approx(0.5)


# ---- across traces -------------------------------------------------------------------------------------


def test_summary_percentiles_match_hand_computed_figures():
    traces = [job_trace(f"j{i}", queue_ms=10 * (i + 1), trace_n=i + 1) for i in range(5)]
    s = summarize(traces)
    assert s.traces == 5
    q = s.figures["queue_wait"]
    assert (q.n, q.p50, q.p95) == (5, pytest.approx(30.0), pytest.approx(48.0))
    assert s.figures["prefill"].p50 == pytest.approx(10.0)
    assert s.figures["steps_per_canvas"].n == 10 and s.figures["steps_per_canvas"].p50 == pytest.approx(2.5)
    assert s.figures["ms_per_step"].p99 == pytest.approx(5.0)
    # First canvas ends queue + prefill + 15 ms after the trace starts.
    assert s.figures["time_to_first_canvas"].p50 == pytest.approx(30 + 10 + 15)
    assert s.figures["tokens_per_s"].p50 == pytest.approx(39 / 0.035)
    assert "tool_time" not in s.figures
    # Self time: queue waits 150 ms of 330 in all, canvases 125, prefill 50, gateway replies 5.
    assert s.dominant == SpanName.QUEUE_WAIT
    assert s.stage_share[SpanName.QUEUE_WAIT] == pytest.approx(150 / 330)
    assert s.stage_share[SpanName.ENGINE_CANVAS] == pytest.approx(125 / 330)
    assert s.stage_share[SpanName.REPLICA_RUN] == pytest.approx(0.0)


def test_dominant_stage_comes_with_advice():
    slow_queue = summarize([job_trace("j", queue_ms=400)])
    assert slow_queue.dominant == SpanName.QUEUE_WAIT and "replicas" in slow_queue.advice
    slow_prefill = summarize([job_trace("j", prefill_ms=400)])
    assert slow_prefill.dominant == SpanName.ENGINE_PREFILL and "session" in slow_prefill.advice
    many_steps = summarize([job_trace("j", canvases_=(([1] * 8, 50, 32),))])
    assert "entropy_bound" in many_steps.advice and "max_denoising_steps" in many_steps.advice
    text = render_summary(slow_queue, label="before")
    assert "1 traces (before)" in text and "dominant stage: queue.wait" in text


def test_labelled_runs_compare_side_by_side_after_a_round_trip():
    before = summarize([job_trace("a", canvases_=(([1] * 8, 10, 32),))])
    after = summarize([job_trace("b", canvases_=(([4, 32], 10, 32),))])
    restored = Summary.from_dict(json.loads(json.dumps(before.to_dict())))
    assert restored == before
    text = render_comparison(restored, after, ("before", "after"))
    row = next(line for line in text.splitlines() if line.startswith("steps_per_canvas"))
    assert row.split()[1:5] == ["8.0", "8.0", "2.0", "2.0"] and row.endswith("-75%")


def test_since_accepts_relative_iso_and_epoch_times():
    assert parse_since("30m", now=10_000.0) == 8_200.0
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2023-11-14T22:13:20+00:00") == 1_700_000_000.0
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday")
