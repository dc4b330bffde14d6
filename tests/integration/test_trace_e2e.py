"""A job through the real service (gRPC gateway, Redis queue, job runner, engine) leaves one trace.

The trace store keeps it and an OTLP receiver started by the test (the collector's own TraceService
definitions) receives the same spans.

The gateway and the runner run in this process, so the process-wide tracer provider `setup_tracing`
installs sees both, as it does in `blockpress serve`'s gateway and in each replica. Span ids come from
the SDK; the checks compare the tree's names, nesting and attributes, and the times' order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from blockpress.runtime import AsyncClient
from blockpress.runtime.cli.trace import run_trace
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.runtime.tracing.store import SpanRecord, TraceStore
from blockpress.runtime.tracing.telemetry import Attr, SpanName, setup_tracing
from blockpress.workers.engine import DiffusionEngine
from blockpress.workers.runner import JobRunner
from blockpress.workers.traced import TracedEngine

pytestmark = pytest.mark.slow

SETTINGS = {"max_new_tokens": 64, "max_denoising_steps": 3, "seed": 7}


@contextlib.asynccontextmanager
async def service(redis_url: str, checkpoint: Path) -> AsyncIterator[int]:
    """Gateway on port 0 and one runner with a traced engine; yields the gateway's port."""
    settings = RuntimeSettings(redis_url=redis_url, host="127.0.0.1", port=0, models=(str(checkpoint),))  # type: ignore[call-arg]
    card = await asyncio.to_thread(load_model_card, str(checkpoint))
    gateway = Gateway.from_settings(settings, {card.name: card})
    engine = await asyncio.to_thread(DiffusionEngine.from_pretrained, str(checkpoint), device="cpu")
    client = aioredis.Redis.from_url(redis_url)
    runner = JobRunner(TracedEngine(engine), JobQueue(client), model=card.name, replica_id="replica-0")
    stop = asyncio.Event()
    loop = asyncio.create_task(runner.run(stop, block_ms=100))
    port = await gateway.start()
    try:
        yield port
    finally:
        stop.set()
        await loop
        await gateway.stop(grace=1)
        await gateway.queue.redis.aclose()
        await client.aclose()


def tree(spans: list[SpanRecord]) -> list[tuple[int, str]]:
    """(depth, name) in depth-first order, siblings by start time: the shape, without the ids."""
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        children[s.parent_id].append(s)
    out: list[tuple[int, str]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children[parent], key=lambda s: s.start_ns):
            out.append((depth, s.name))
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return out


def wait_for_trace(store: TraceStore, job_id: str, *, names: set[str], timeout_s: float = 30) -> list[SpanRecord]:
    # The runner ends `replica.run` just after the final write the client already saw; the store writes
    # off the hot path. Both are moments away.
    deadline = time.monotonic() + timeout_s
    while True:
        spans = store.get_trace(job_id)
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP collector's trace service: keeps the (trace id, span id) of every span it is sent."""

    def __init__(self) -> None:
        self.ids: set[tuple[str, str]] = set()

    def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.ids |= {(s.trace_id.hex(), s.span_id.hex()) for s in ss.spans}
        return trace_service_pb2.ExportTraceServiceResponse()


class Detachable(SpanProcessor):
    """Forwards to `inner` until detached: the process-wide provider outlives this test's receiver."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner, self.attached = inner, True

    def on_end(self, span: ReadableSpan) -> None:
        if self.attached:
            self.inner.on_end(span)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def detach(self) -> None:
        self.attached = False
        self.inner.shutdown()


async def test_a_job_leaves_one_trace_with_the_expected_shape(redis_server: Any, tiny_checkpoint: Path):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    export = Detachable(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{otlp_port}", insecure=True)))
    setup_tracing("blockpress-test", redis_url=redis_server.url, processors=(export,))
    try:
        async with service(redis_server.url, tiny_checkpoint) as port, AsyncClient(f"127.0.0.1:{port}") as client:
            submitted_ns = time.time_ns()
            result = await client.generate("The trace of one job", **SETTINGS)
            done_ns = time.time_ns()
            with redis.Redis.from_url(redis_server.url) as reader:
                names = {SpanName.REPLICA_RUN, "gateway.Run"}  # generate() waits with one unary Run call
                spans = await asyncio.to_thread(wait_for_trace, TraceStore(reader), result.job_id, names=names)
            # The SDK and the CLI get the same trace from the gateway.
            assert await client.trace(result.job_id) == spans
            args = argparse.Namespace(target=result.job_id, address=f"127.0.0.1:{port}", redis_url=None, json=True)
            out = io.StringIO()
            assert await asyncio.to_thread(run_trace, args, out=out) == 0
            assert [d["span_id"] for d in json.loads(out.getvalue())["spans"]] == [s.span_id for s in spans]
        assert export.force_flush(10_000)
    finally:
        export.detach()
        server.stop(grace=None).wait()
    # The collector got the same trace the store kept.
    assert {(s.trace_id, s.span_id) for s in spans} <= receiver.ids

    canvases = result.canvases
    assert canvases >= 1
    assert tree(spans) == [
        (0, "gateway.Run"),
        (1, SpanName.QUEUE_WAIT),
        (1, SpanName.REPLICA_RUN),
        (2, SpanName.ENGINE_PREFILL),
        (2, SpanName.ENGINE_CANVAS),
        *[(2, name) for _ in range(canvases - 1) for name in (SpanName.ENGINE_COMMIT, SpanName.ENGINE_CANVAS)],
    ]
    assert len({s.trace_id for s in spans}) == 1
    by_name: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        by_name[s.name].append(s)
    [root], [wait], [run], [prefill] = (
        by_name[n] for n in ("gateway.Run", "queue.wait", "replica.run", "engine.prefill")
    )
    assert root.attributes[Attr.RPC_SYSTEM] == "grpc" and root.attributes[Attr.RPC_METHOD] == "Run"
    assert root.attributes[Attr.RPC_SERVICE] == "blockpress.v1.Runtime"
    assert root.attributes[Attr.RPC_GRPC_STATUS_CODE] == 0
    for span in (wait, run):
        assert span.attributes[Attr.JOB_ID] == result.job_id
        assert span.attributes[Attr.GEN_AI_REQUEST_MODEL] == tiny_checkpoint.name
        assert span.attributes[Attr.JOB_ATTEMPT] == 1
    assert run.attributes[Attr.REPLICA] == "replica-0" and run.attributes[Attr.JOB_KIND] == "generate"
    assert prefill.attributes[Attr.GEN_AI_INPUT_TOKENS] == result.usage.prompt_tokens
    engine_spans = sorted(by_name[SpanName.ENGINE_CANVAS], key=lambda s: s.start_ns)
    assert [c.attributes[Attr.CANVAS_INDEX] for c in engine_spans] == list(range(canvases))
    assert sum(c.attributes[Attr.CANVAS_TOKENS] for c in engine_spans) == len(result.token_ids)
    for c in engine_spans:
        steps = [e for e in c.events if e.name == SpanName.STEP_EVENT]
        assert len(steps) == c.attributes[Attr.CANVAS_STEPS] <= c.attributes[Attr.CANVAS_MAX_STEPS] == 3
        assert [e.attributes[Attr.STEP] for e in steps] == list(range(1, len(steps) + 1))
        assert all(c.start_ns <= e.time_ns <= c.end_ns for e in steps)
    # Times nest as the spans do: the wait precedes the run, the engine runs inside the run.
    assert root.start_ns <= wait.start_ns <= wait.end_ns <= run.start_ns <= prefill.start_ns
    # Against the test's own clock: the wait began after the call was made and ended before the job's
    # result came back; the prefill is the engine's figure, not the time up to the first canvas.
    assert submitted_ns <= root.start_ns and wait.end_ns <= done_ns
    assert prefill.end_ns <= engine_spans[0].start_ns
    assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(engine_spans))
    # The call ends when the client has its final event, the last canvas came before that; the run
    # itself may end a moment after the call, as it closes its span once its final write returned.
    assert engine_spans[-1].end_ns <= min(run.end_ns, root.end_ns)


async def test_jobs_complete_with_the_trace_store_unreachable(redis_server: Any, tiny_checkpoint: Path):
    # A trace store on a port nobody listens on, beside the live one: its writes fail and its spans are
    # dropped and counted; the jobs do not notice.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    setup_tracing("blockpress-test", redis_url=f"redis://127.0.0.1:{dead_port}/0")
    async with service(redis_server.url, tiny_checkpoint) as port, AsyncClient(f"127.0.0.1:{port}") as client:
        results = [await client.generate(f"job {i}", **SETTINGS) for i in range(3)]
    assert len({r.job_id for r in results}) == 3 and all(r.token_ids for r in results)
