"""Span vocabulary, context propagation and the traced engine stream, against an in-memory exporter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from blockpress.runtime.tracing.telemetry import Attr, SpanName, extract_context, inject_context, record_queue_wait
from blockpress.workers.errors import GenerationCancelled
from blockpress.workers.traced import TracedEngine, trace_stream
from blockpress.workers.types import (
    CanvasEvent,
    CanvasStats,
    DraftEvent,
    EndEvent,
    GenerationResult,
    StreamEvent,
    Timings,
)


@pytest.fixture
def spans() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def _canvas(index: int, accepted: list[int], entropies: list[float], tokens: int) -> list[StreamEvent]:
    step_s = [0.001 * (i + 1) for i in range(len(accepted))]
    steps = enumerate(zip(accepted, entropies, step_s, strict=True))
    drafts: list[StreamEvent] = [DraftEvent(index, i, [0], a, e, s) for i, (a, e, s) in steps]
    stats = CanvasStats(index, len(accepted), 8, tokens, entropies[-1], accepted, step_s)
    return [*drafts, CanvasEvent(index, [1] * tokens, "x" * tokens, stats)]


def _stream(*, end: bool = True, fail_at: int | None = None) -> Iterator[StreamEvent]:
    events = _canvas(0, [3, 10, 20], [2.0, 1.0, 0.1], 16) + _canvas(1, [5, 30], [1.5, 0.05], 7)
    for i, event in enumerate(events):
        if i == fail_at:
            raise GenerationCancelled("cancelled")
        yield event
    if end:
        result = GenerationResult([1] * 23, "x" * 23, "stop_token", 12, 9, [], Timings(prefill_s=0.0005), seed=1)
        yield EndEvent(result)


def _by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted((s for s in finished if s.name == name), key=lambda s: s.start_time or 0)


def test_stream_becomes_prefill_and_canvas_spans_under_the_current_span(spans):
    tracer, exporter = spans
    with tracer.start_as_current_span(SpanName.REPLICA_RUN) as run:
        passed = list(trace_stream(_stream(), tracer=tracer))
    assert len(passed) == 2 * 1 + 3 + 2 + 1, "every event passes through unchanged"
    finished = exporter.get_finished_spans()
    prefill = _by_name(finished, SpanName.ENGINE_PREFILL)
    canvases = _by_name(finished, SpanName.ENGINE_CANVAS)
    assert len(prefill) == 1 and len(canvases) == 2
    run_id = run.get_span_context().span_id
    for span in [*prefill, *canvases]:
        assert span.parent is not None and span.parent.span_id == run_id
    assert prefill[0].attributes[Attr.GEN_AI_INPUT_TOKENS] == 12
    assert prefill[0].attributes[Attr.PREFILL_TOKENS] == 9
    first, second = canvases
    assert first.attributes[Attr.CANVAS_INDEX] == 0 and second.attributes[Attr.CANVAS_INDEX] == 1
    assert first.attributes[Attr.CANVAS_STEPS] == 3 and first.attributes[Attr.CANVAS_MAX_STEPS] == 8
    assert first.attributes[Attr.CANVAS_TOKENS] == 16 and second.attributes[Attr.CANVAS_TOKENS] == 7
    assert second.attributes[Attr.CANVAS_MEAN_ENTROPY] == pytest.approx(0.05)
    steps = [dict(e.attributes or {}) for e in first.events]
    assert [e.name for e in first.events] == [SpanName.STEP_EVENT] * 3
    assert [s[Attr.ACCEPTED] for s in steps] == [3, 10, 20]
    assert [s[Attr.STEP] for s in steps] == [0, 1, 2]
    assert [s[Attr.STEP_MS] for s in steps] == pytest.approx([1.0, 2.0, 3.0])
    assert [s[Attr.MEAN_ENTROPY] for s in steps] == pytest.approx([2.0, 1.0, 0.1])
    # Canvases follow each other on the time axis and their steps lie inside them.
    assert first.end_time is not None and second.start_time == first.end_time
    assert all(first.start_time <= e.timestamp <= first.end_time for e in first.events)  # type: ignore[operator]


def test_canvas_without_drafts_takes_its_steps_from_the_canvas_statistics(spans):
    tracer, exporter = spans
    events = [e for e in _stream() if not isinstance(e, DraftEvent)]
    list(trace_stream(iter(events), tracer=tracer))
    first = _by_name(exporter.get_finished_spans(), SpanName.ENGINE_CANVAS)[0]
    assert [dict(e.attributes or {})[Attr.ACCEPTED] for e in first.events] == [3, 10, 20]
    assert all(Attr.MEAN_ENTROPY not in (e.attributes or {}) for e in first.events)


def test_an_engine_error_marks_the_canvas_it_happened_in_and_propagates(spans):
    tracer, exporter = spans
    with pytest.raises(GenerationCancelled):
        list(trace_stream(_stream(fail_at=5), tracer=tracer))  # inside canvas 1, after one step
    finished = exporter.get_finished_spans()
    canvases = _by_name(finished, SpanName.ENGINE_CANVAS)
    assert len(canvases) == 2
    assert canvases[0].status.status_code is trace.StatusCode.UNSET
    assert canvases[1].status.status_code is trace.StatusCode.ERROR
    assert canvases[1].attributes[Attr.CANVAS_INDEX] == 1
    assert [e.name for e in canvases[1].events] == [SpanName.STEP_EVENT, "exception"]
    assert len(_by_name(finished, SpanName.ENGINE_PREFILL)) == 1, "prefill is closed, not leaked"


def test_a_consumer_that_stops_early_leaves_no_open_prefill(spans):
    tracer, exporter = spans
    stream = trace_stream(_stream(), tracer=tracer)
    next(stream)
    stream.close()
    assert [s.name for s in exporter.get_finished_spans()] == [SpanName.ENGINE_PREFILL]


def test_without_a_recording_tracer_the_stream_is_passed_through(spans):
    events = list(_stream())
    assert list(trace_stream(iter(events), tracer=trace.NoOpTracer())) == events


def test_traced_engine_generate_returns_the_result_and_delegates_the_rest(spans):
    tracer, exporter = spans

    class Engine:
        model_name = "tiny"

        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        def stream(self, prompt: str, settings: Any = None, **kwargs: Any) -> Iterator[StreamEvent]:
            assert prompt == "hi"
            self.calls.append({"settings": settings, **kwargs})
            return _stream()

    inner = Engine()
    engine = TracedEngine(inner, tracer=tracer)  # type: ignore[arg-type]
    assert engine.model_name == "tiny"
    cancel = threading.Event()
    assert engine.generate("hi", cancel=cancel, template=[None, 7]).prompt_tokens == 12
    assert inner.calls == [{"settings": None, "cancel": cancel, "session": None, "template": [None, 7]}]
    assert len(_by_name(exporter.get_finished_spans(), SpanName.ENGINE_CANVAS)) == 2
    # The wrapper spells out the seam instead of forwarding whatever is asked of it.
    assert not hasattr(TracedEngine, "__getattr__")


def test_a_traced_stream_closed_early_closes_the_engines_stream(spans):
    tracer, _ = spans
    closed = []

    def engine_stream() -> Iterator[StreamEvent]:
        try:
            yield from _stream()
        finally:
            closed.append(True)

    inner = engine_stream()
    traced = trace_stream(inner, tracer=tracer)
    next(traced)
    traced.close()
    assert closed == [True]


def test_context_travels_through_w3c_headers(spans):
    tracer, exporter = spans
    with tracer.start_as_current_span(SpanName.gateway("Submit")) as gateway:
        headers = inject_context()
    assert set(headers) >= {"traceparent"}
    trace_id = gateway.get_span_context().trace_id
    assert f"{trace_id:032x}" in headers["traceparent"]
    record_queue_wait(
        job_id="j1", model="tiny", submitted_at=100.0, started_at=100.25, trace_context=headers, tracer=tracer
    )
    wait = _by_name(exporter.get_finished_spans(), SpanName.QUEUE_WAIT)[0]
    assert wait.context is not None and wait.context.trace_id == trace_id
    assert wait.parent is not None and wait.parent.span_id == gateway.get_span_context().span_id
    assert (wait.end_time or 0) - (wait.start_time or 0) == 250_000_000
    assert wait.attributes[Attr.JOB_ID] == "j1"


def test_no_headers_means_a_fresh_root():
    assert inject_context() == {}
    assert trace.get_current_span(extract_context(None)).get_span_context().is_valid is False
