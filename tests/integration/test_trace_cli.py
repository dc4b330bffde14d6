"""`blockpress trace` end to end over a real trace store: waterfall, --json, --html, stats and --compare."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider

from blockpress.runtime.cli.trace import add_trace_commands
from blockpress.runtime.tracing.store import TraceStore, TraceStoreProcessor
from blockpress.runtime.tracing.telemetry import Attr, SpanName
from blockpress.workers.traced import trace_stream
from blockpress.workers.types import CanvasEvent, CanvasStats, DraftEvent, EndEvent, GenerationResult, Timings


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """The session's redis-server (tests/conftest.py); each test empties it before use."""
    return str(redis_server.url)


def _events(steps: int) -> Iterator[object]:
    accepted = [4 * (i + 1) for i in range(steps)]
    stats = CanvasStats(0, steps, 8, 16, 0.3, accepted, [0.0] * steps)
    for i, a in enumerate(accepted):
        yield DraftEvent(0, i, [0], a, 1.0 / (i + 1), 0.0)
    yield CanvasEvent(0, [1] * 16, "x" * 16, stats)
    yield EndEvent(GenerationResult([1] * 16, "x", "stop_token", 3, 3, [stats], Timings(), 0))


@pytest.fixture
def store(redis_url: str) -> Iterator[tuple[TraceStore, TracerProvider]]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    provider = TracerProvider()
    processor = TraceStoreProcessor(client, retention_s=3600, flush_interval_s=0.05)
    provider.add_span_processor(processor)
    yield TraceStore(client), provider
    provider.shutdown()
    client.close()


def run_job(provider: TracerProvider, job_id: str, *, steps: int, model: str = "tiny") -> None:
    """A job as the runtime traces it: gateway call, queue wait, replica run, traced engine stream."""
    tracer = provider.get_tracer("test")
    attrs = {Attr.JOB_ID: job_id, Attr.GEN_AI_REQUEST_MODEL: model}
    with tracer.start_as_current_span(SpanName.gateway("Generate"), attributes=attrs):
        tracer.start_span(SpanName.QUEUE_WAIT, attributes=attrs).end()
        with tracer.start_as_current_span(SpanName.REPLICA_RUN, attributes=attrs):
            list(trace_stream(_events(steps), tracer=tracer))  # type: ignore[arg-type]
    assert provider.force_flush(5_000)


def cli(store: TraceStore, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="blockpress")
    add_trace_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trace", *argv])
    out = io.StringIO()
    return args.func(args, store=store, out=out), out.getvalue()


def test_trace_job_prints_a_waterfall_and_the_canvas_table(store):
    traces, provider = store
    run_job(provider, "job-1", steps=3)
    status, text = cli(traces, "job-1")
    assert status == 0
    for label in ("gateway.Generate", "  queue.wait", "  replica.run", "    engine.prefill", "    engine.canvas #0"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    assert "3/8" in text and "4 8 12" in text
    assert "largest stage:" in text.splitlines()[-1]


def test_trace_json_and_html_hold_every_span(store, tmp_path):
    traces, provider = store
    run_job(provider, "job-2", steps=2)
    spans = traces.get_trace("job-2")
    assert len(spans) == 5
    status, text = cli(traces, "job-2", "--json")
    assert status == 0
    assert {s["span_id"] for s in json.loads(text)["spans"]} == {s.span_id for s in spans}
    page = tmp_path / "job.html"
    status, _ = cli(traces, "job-2", "--html", str(page))
    html = page.read_text()
    assert status == 0 and html.startswith("<!doctype html>")
    assert all(f'data-span-id="{s.span_id}"' in html for s in spans)


def test_unknown_job_exits_non_zero(store, capsys):
    traces, _ = store
    status, _ = cli(traces, "nope")
    assert status == 1 and "no trace kept for 'nope'" in capsys.readouterr().err


def test_stats_summarise_recent_jobs_and_compare_labelled_runs(store):
    traces, provider = store
    for i in range(4):
        run_job(provider, f"before-{i}", steps=8)
    status, before = cli(traces, "stats", "--last", "4", "--label", "before")
    assert status == 0 and "4 traces (before)" in before
    steps_row = next(line for line in before.splitlines() if line.startswith("steps_per_canvas"))
    assert steps_row.split()[2:5] == ["8.0", "8.0", "8.0"]
    for i in range(4):
        run_job(provider, f"after-{i}", steps=2, model="other")
    status, after = cli(traces, "stats", "--model", "other", "--label", "after", "--json")
    assert status == 0 and json.loads(after)["traces"] == 4
    status, table = cli(traces, "stats", "--compare", "before", "after")
    assert status == 0
    row = next(line for line in table.splitlines() if line.startswith("steps_per_canvas"))
    assert row.split()[1:5] == ["8.0", "8.0", "2.0", "2.0"] and row.endswith("-75%")


def test_diff_compares_two_jobs_two_filters_or_a_labelled_run(store):
    traces, provider = store
    for i in range(3):
        run_job(provider, f"slow-{i}", steps=8)
    status, _ = cli(traces, "stats", "--model", "tiny", "--label", "slow")
    assert status == 0
    for i in range(3):
        run_job(provider, f"quick-{i}", steps=2, model="other")
    for a, b in (("slow-0", "quick-0"), ("model=tiny,last=3", "model=other,since=1h"), ("@slow", "model=other")):
        status, text = cli(traces, "diff", a, b)
        assert status == 0, (a, b)
        lines = text.splitlines()
        assert lines[0].startswith(f"A: {a} (") and lines[1].startswith(f"B: {b} (")
        assert any(line.startswith(SpanName.ENGINE_CANVAS) for line in lines)
        assert any(line.startswith("steps per canvas") and line.split()[-2:] == ["8.0", "2.0"] for line in lines)
        assert any(line.startswith("hint (A):") and ("3 of 3" in line or "1 of 1" in line) for line in lines)
        assert not any(line.startswith("hint (B):") and "step limit" in line for line in lines)
    status, text = cli(traces, "diff", "slow-0", "quick-0", "--json")
    assert status == 0 and json.loads(text)["a"]["at_step_limit"] == 1


def test_diff_explains_what_it_cannot_compare(store, capsys):
    traces, provider = store
    run_job(provider, "only", steps=2)
    assert cli(traces, "diff", "only")[0] == 2
    assert cli(traces, "diff", "only", "model=nobody")[0] == 1
    assert "no traces for 'model=nobody'" in capsys.readouterr().err
    assert cli(traces, "diff", "only", "colour=blue")[0] == 1
    assert "key one of model, since, until, last" in capsys.readouterr().err


def test_chrome_format_writes_trace_event_json(store, tmp_path):
    traces, provider = store
    run_job(provider, "job-chrome", steps=3)
    status, text = cli(traces, "job-chrome", "--format", "chrome")
    assert status == 0
    doc = json.loads(text)
    names = [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {"gateway.Generate", "queue.wait", "replica.run", "engine.prefill", "engine.canvas #0"} <= set(names)
    assert sum(name.startswith("step ") for name in names) == 3
    out = tmp_path / "job.json"
    assert cli(traces, "job-chrome", "--format", "chrome", "-o", str(out))[0] == 0
    assert json.loads(out.read_text()) == doc
