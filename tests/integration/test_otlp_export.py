"""With OTEL_EXPORTER_OTLP_ENDPOINT set, `setup_tracing` exports over OTLP to a real receiver.

The gRPC receiver is a grpc server on port 0 implementing the collector's TraceService from the
`opentelemetry-proto` package, the HTTP one a stdlib server decoding the same protobuf messages, so
what they check is the wire format a real collector would get, over the protocol the variables name.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import ClassVar

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from blockpress.runtime.tracing.telemetry import Attr, SpanName, otlp_exporter, setup_tracing
from blockpress.workers.traced import trace_stream
from blockpress.workers.types import CanvasEvent, CanvasStats, DraftEvent, EndEvent, GenerationResult, Timings


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span with the service name of its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None).wait()


def _engine_events() -> Iterator[object]:
    stats = CanvasStats(0, 2, 8, 5, 0.2, [6, 32], [0.001, 0.001])
    yield DraftEvent(0, 0, [0], 6, 1.5, 0.001)
    yield DraftEvent(0, 1, [0], 32, 0.2, 0.001)
    yield CanvasEvent(0, [1] * 5, "hello", stats)
    yield EndEvent(GenerationResult([1] * 5, "hello", "stop_token", 4, 4, [stats], Timings(prefill_s=0.001), 0))


def _attrs(span: trace_pb2.Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        out[kv.key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return out


def test_a_traced_job_reaches_the_otlp_receiver(receiver, monkeypatch):
    servicer, port = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    provider = setup_tracing("blockpress-test", set_global=False)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(SpanName.REPLICA_RUN, attributes={Attr.JOB_ID: "job-otlp"}) as run:
        list(trace_stream(_engine_events(), tracer=tracer))  # type: ignore[arg-type]
    assert provider.force_flush(10_000)
    provider.shutdown()

    by_name = {span.name: (service, span) for service, span in servicer.spans}
    assert set(by_name) == {SpanName.REPLICA_RUN, SpanName.ENGINE_PREFILL, SpanName.ENGINE_CANVAS}
    trace_id = run.get_span_context().trace_id.to_bytes(16, "big")
    assert {span.trace_id for _, span in servicer.spans} == {trace_id}, "one trace"
    assert {service for service, _ in servicer.spans} == {"blockpress-test"}
    run_span = by_name[SpanName.REPLICA_RUN][1]
    canvas = by_name[SpanName.ENGINE_CANVAS][1]
    assert canvas.parent_span_id == run_span.span_id
    assert _attrs(canvas)[Attr.CANVAS_TOKENS] == 5 and _attrs(run_span)[Attr.JOB_ID] == "job-otlp"
    assert [e.name for e in canvas.events] == [SpanName.STEP_EVENT] * 2
    assert [_attrs(e)[Attr.ACCEPTED] for e in canvas.events] == [6, 32]  # type: ignore[arg-type]


class _HttpReceiver(http.server.BaseHTTPRequestHandler):
    """OTLP/HTTP: protobuf `ExportTraceServiceRequest` bodies POSTed to /v1/traces."""

    received: ClassVar[list[tuple[str, trace_pb2.Span]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.received += [(self.path, span) for span in scope_spans.spans]
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
def test_the_protocol_variables_choose_otlp_over_http(variable, monkeypatch):
    _HttpReceiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HttpReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv(variable, "http/protobuf")
        if variable == "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL":
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # the traces-specific one wins
        provider = setup_tracing("blockpress-test", set_global=False)
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span(SpanName.REPLICA_RUN):
            list(trace_stream(_engine_events(), tracer=tracer))  # type: ignore[arg-type]
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert {path for path, _ in _HttpReceiver.received} == {"/v1/traces"}
    names = {span.name for _, span in _HttpReceiver.received}
    assert names == {SpanName.REPLICA_RUN, SpanName.ENGINE_PREFILL, SpanName.ENGINE_CANVAS}


def test_an_unsupported_protocol_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        otlp_exporter()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert type(otlp_exporter()).__module__.endswith("grpc.trace_exporter")
