"""OpenTelemetry for BlockPress: process setup, the shared span vocabulary, context propagation.

Every process (gateway, replica, CLI-embedded runtime) calls `setup_tracing` once at its entry point.
Library code only calls `get_tracer()`; before setup that returns OpenTelemetry's no-op proxy, so
tracing costs nothing where nobody configured it.

The trace context of a job travels in `JobSpec.trace_context` as W3C headers: the gateway calls
`inject_context()` while its span is current, the replica calls `extract_context(spec.trace_context)`
and parents `queue.wait` and `replica.run` on the result, so one trace covers the whole job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from blockpress.runtime.tracing.names import Attr, SpanName

if TYPE_CHECKING:
    from blockpress.workers.types import CanvasEvent, DraftEvent, GenerationResult, StreamEvent

__all__ = [
    "Attr",
    "SpanName",
    "TracedEngine",
    "extract_context",
    "get_tracer",
    "inject_context",
    "record_queue_wait",
    "setup_tracing",
    "trace_stream",
]

_INSTRUMENTATION: Final = "blockpress"
DEFAULT_RETENTION_S: Final = 7 * 24 * 3600
# A canvas span carries one event per denoising step; the SDK's default cap (128) would silently cut a
# canvas that runs under a high step limit, and the convergence curve is what a person tunes by.
_DEFAULT_MAX_EVENTS: Final = 1024


def setup_tracing(
    service_name: str,
    *,
    redis_url: str | None = None,
    retention_s: float = DEFAULT_RETENTION_S,
    processors: tuple[SpanProcessor, ...] = (),
    set_global: bool = True,
) -> TracerProvider:
    """Configure tracing for this process and return the provider.

    Args:
        service_name: `service.name` of the resource, e.g. `blockpress-gateway`; `OTEL_SERVICE_NAME`
            and `OTEL_RESOURCE_ATTRIBUTES` still apply on top as the SDK defines.
        redis_url: where the BlockPress trace store keeps finished spans; None keeps none.
        retention_s: how long the trace store keeps a trace after its last span ended.
        processors: extra span processors (tests pass an in-memory exporter here).
        set_global: install the provider as OpenTelemetry's global one, which `get_tracer()` reads.
            OpenTelemetry allows one global provider per process, so a second call returns the first
            provider, adding only a trace store for a Redis URL it does not write to yet and
            `processors`. The provider flushes at interpreter exit.

    OTLP export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    is set; every other `OTEL_*` variable (headers, protocol, sampler, limits) is read by the SDK.
    """
    global _global_provider
    if set_global and _global_provider is not None:
        provider = _global_provider
    else:
        max_events = int(os.environ.get("OTEL_SPAN_EVENT_COUNT_LIMIT", _DEFAULT_MAX_EVENTS))
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            span_limits=SpanLimits(max_events=max_events),
        )
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            # Imported here: the exporter pulls in grpc channel machinery a client may never need.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if redis_url is not None and not (set_global and redis_url in _global_stores):
        from blockpress.runtime.tracing.store import TraceStoreProcessor

        provider.add_span_processor(TraceStoreProcessor.from_url(redis_url, retention_s=retention_s))
        if set_global:
            _global_stores.add(redis_url)
    for processor in processors:
        provider.add_span_processor(processor)
    if set_global and _global_provider is None:
        trace.set_tracer_provider(provider)
        _global_provider = provider
    return provider


_global_provider: TracerProvider | None = None
_global_stores: set[str] = set()


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The BlockPress tracer, from `provider` or the global one (a no-op until `setup_tracing`)."""
    return trace.get_tracer(_INSTRUMENTATION, tracer_provider=provider)


def inject_context(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace-context headers (`traceparent`, `tracestate`) for the current or given context.

    Empty when no span is recording, so a job submitted without tracing carries nothing.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a job's `trace_context` headers describe; a fresh root context when there are none."""
    return propagate.extract(dict(carrier or {}))


def record_queue_wait(
    *,
    job_id: str,
    model: str,
    submitted_at: float,
    trace_context: Mapping[str, str] | None,
    attempt: int = 1,
    started_at: float | None = None,
    tracer: trace.Tracer | None = None,
) -> None:
    """Record the `queue.wait` span of one delivery: from submission to the replica taking the job.

    The span is created after the fact with explicit times, because nothing runs while a job waits.

    Args:
        submitted_at: epoch seconds, `JobSpec.submitted_at`.
        started_at: epoch seconds the replica took the job; now when None.
    """
    tracer = tracer or get_tracer()
    end_ns = time.time_ns() if started_at is None else int(started_at * 1e9)
    start_ns = min(int(submitted_at * 1e9), end_ns)
    attributes: dict[str, Any] = {
        Attr.JOB_ID: job_id,
        Attr.GEN_AI_REQUEST_MODEL: model,
        Attr.JOB_ATTEMPT: attempt,
    }
    span = tracer.start_span(
        SpanName.QUEUE_WAIT,
        context=extract_context(trace_context),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        start_time=start_ns,
    )
    span.end(end_time=end_ns)


class TracedEngine:
    """An engine with the same surface whose `stream` and `generate` record engine spans.

    Everything but `stream` and `generate` is passed through to the wrapped engine untouched.
    """

    def __init__(self, engine: Any, *, tracer: trace.Tracer | None = None) -> None:
        self._engine = engine
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[StreamEvent]:
        return trace_stream(self._engine.stream(*args, **kwargs), tracer=self._tracer)

    def generate(self, *args: Any, **kwargs: Any) -> GenerationResult:
        from blockpress.workers.types import EndEvent

        for event in self.stream(*args, **kwargs):
            if isinstance(event, EndEvent):
                return event.result
        raise RuntimeError("the engine's stream ended without an EndEvent")


def trace_stream(events: Iterable[StreamEvent], *, tracer: trace.Tracer | None = None) -> Iterator[StreamEvent]:
    """Pass an engine stream through, recording `engine.prefill` and one `engine.canvas` per canvas.

    Spans are parented on the context current when iteration starts (the replica's `replica.run`).
    A denoising step costs one clock read and one list append here; the span and its step events are
    built once per canvas, when the canvas is committed, so tracing stays off the step loop.
    """
    from blockpress.workers.types import CanvasEvent, DraftEvent, EndEvent

    tracer = tracer or get_tracer()
    recorder = _StreamRecorder(tracer, otel_context.get_current(), time.time_ns())
    if not recorder.prefill.is_recording():
        yield from events
        return
    steps = recorder.steps
    try:
        for event in events:
            now = time.time_ns()
            if type(event) is DraftEvent:
                steps.append((now, event))
            elif isinstance(event, CanvasEvent):
                recorder.canvas(now, event)
            elif isinstance(event, EndEvent):
                recorder.end(event.result)
            yield event
    except Exception as exc:  # not GeneratorExit: a consumer that stops early is no failure
        recorder.fail(exc)
        raise
    finally:
        recorder.close()


class _StreamRecorder:
    """Turns the events of one engine stream into spans; see `trace_stream`."""

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, start_ns: int) -> None:
        self.tracer = tracer
        self.parent = parent
        self.start_ns = start_ns
        self.prefill = tracer.start_span(SpanName.ENGINE_PREFILL, context=parent, start_time=start_ns)
        self.prefill_open = True
        self.steps: list[tuple[int, DraftEvent]] = []
        self.canvas_start_ns: int | None = None

    def _canvas_start(self, now: int, step_s: float) -> int:
        # The engine reports nothing when prefill ends; it ended one step before the first step was
        # reported, which is exact enough for a waterfall and costs nothing.
        if self.steps:
            now, step_s = self.steps[0][0], self.steps[0][1].step_s
        if self.canvas_start_ns is None:
            self.canvas_start_ns = max(self.start_ns, now - int(step_s * 1e9))
        return self.canvas_start_ns

    def _canvas_span(self, start: int, attributes: dict[str, Any]) -> trace.Span:
        span = self.tracer.start_span(
            SpanName.ENGINE_CANVAS, context=self.parent, start_time=start, attributes=attributes
        )
        for at, d in self.steps:
            span.add_event(SpanName.STEP_EVENT, _step(d.step, d.step_s, d.accepted, d.mean_entropy), timestamp=at)
        self.steps.clear()
        return span

    def canvas(self, now: int, event: CanvasEvent) -> None:
        stats = event.stats
        start = self._canvas_start(now, sum(stats.step_s))
        had_drafts = bool(self.steps)
        span = self._canvas_span(
            start,
            {
                Attr.CANVAS_INDEX: stats.index,
                Attr.CANVAS_STEPS: stats.steps,
                Attr.CANVAS_MAX_STEPS: stats.max_steps,
                Attr.CANVAS_TOKENS: stats.tokens_committed,
                Attr.CANVAS_MEAN_ENTROPY: stats.mean_entropy,
            },
        )
        if not had_drafts:
            # No drafts were streamed: the canvas's own statistics still give every step but its entropy.
            at = start
            # Steps count from 1, as the engine's `DraftEvent.step` does.
            for i, (step_s, accepted) in enumerate(zip(stats.step_s, stats.accepted_per_step, strict=False), 1):
                at += int(step_s * 1e9)
                span.add_event(SpanName.STEP_EVENT, _step(i, step_s, accepted, None), timestamp=at)
        span.end(end_time=now)
        self.canvas_start_ns = now

    def end(self, result: GenerationResult) -> None:
        self.prefill.set_attribute(Attr.GEN_AI_INPUT_TOKENS, result.prompt_tokens)
        self.prefill.set_attribute(Attr.PREFILL_TOKENS, result.prefilled_tokens)
        self.prefill.end(end_time=self.start_ns + int(result.timings.prefill_s * 1e9))
        self.prefill_open = False

    def fail(self, exc: Exception) -> None:
        """Mark the stage the engine was in when it raised (cancelled, broken) as failed."""
        if self.steps:
            index, taken = self.steps[0][1].canvas_index, len(self.steps)
            span = self._canvas_span(self._canvas_start(0, 0.0), {Attr.CANVAS_INDEX: index, Attr.CANVAS_STEPS: taken})
        elif self.canvas_start_ns is None:
            span = self.prefill
        else:
            return
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        if span is not self.prefill:
            span.end()

    def close(self) -> None:
        if self.prefill_open:
            self.prefill.end(end_time=self.canvas_start_ns)
            self.prefill_open = False


def _step(step: int, step_s: float, accepted: int, mean_entropy: float | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {Attr.STEP: step, Attr.STEP_MS: step_s * 1e3, Attr.ACCEPTED: accepted}
    if mean_entropy is not None:
        attributes[Attr.MEAN_ENTROPY] = mean_entropy
    return attributes
