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
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from blockpress.runtime.tracing.names import Attr, SpanName

__all__ = [
    "Attr",
    "CanvasCounter",
    "SpanName",
    "canvas_counter",
    "extract_context",
    "get_tracer",
    "inject_context",
    "job_context",
    "otlp_exporter",
    "record_queue_wait",
    "setup_tracing",
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
            provider.add_span_processor(BatchSpanProcessor(otlp_exporter()))
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


def otlp_exporter() -> SpanExporter:
    """The OTLP span exporter `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (else `OTEL_EXPORTER_OTLP_PROTOCOL`) asks for.

    `grpc` (the default, as the Python SDK's own distro has it, and what the k8s collector listens for
    on 4317) or `http/protobuf` (port 4318, path /v1/traces); endpoint, headers, timeout and TLS come
    from the other `OTEL_EXPORTER_OTLP_*` variables, read by the exporter itself.

    Raises:
        ValueError: another protocol (`http/json` has no Python exporter), or its package is missing.
    """
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    # Imported here: each exporter pulls in transport machinery (grpc channels, requests) a client may never need.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        except ImportError:
            raise ValueError(
                "OTLP protocol http/protobuf needs the opentelemetry-exporter-otlp-proto-http package"
            ) from None
        return HttpExporter()
    raise ValueError(f"OTLP protocol {protocol!r} is not supported here: use grpc or http/protobuf")


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


class CanvasCounter:
    """Numbers a job's canvases across its generations, so an agent's second turn goes on from #N."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0

    def peek(self) -> int:
        return self._value

    def next(self) -> int:
        value, self._value = self._value, self._value + 1
        return value


_CANVASES: Final = otel_context.create_key("blockpress.canvases")


def job_context(ctx: otel_context.Context) -> otel_context.Context:
    """`ctx` with a fresh `CanvasCounter` that every span context opened under it shares."""
    return otel_context.set_value(_CANVASES, CanvasCounter(), ctx)


def canvas_counter(ctx: otel_context.Context | None = None) -> CanvasCounter | None:
    """The job's canvas counter in `ctx` (default the current context); None outside a job."""
    value = otel_context.get_value(_CANVASES, ctx)
    return value if isinstance(value, CanvasCounter) else None


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
