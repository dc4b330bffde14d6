"""The trace store against a real redis-server: what is kept, for how long, and that it never blocks."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from redis.backoff import NoBackoff
from redis.retry import Retry

from blockpress.runtime.tracing.store import SpanRecord, TraceStore, TraceStoreProcessor
from blockpress.runtime.tracing.telemetry import Attr, SpanName

# A fixed "now" for the store's clock; expiry itself is Redis's, so it is anchored to the real clock.
NOW = float(int(time.time()))
HOUR_NS = 3600 * 10**9


class SequentialIds(IdGenerator):
    """Deterministic ids so that a test can name the trace it expects."""

    def __init__(self) -> None:
        self.traces = 0
        self.spans = 0

    def generate_trace_id(self) -> int:
        self.traces += 1
        return self.traces

    def generate_span_id(self) -> int:
        self.spans += 1
        return self.spans


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """The session's redis-server (tests/conftest.py); each test empties it before use."""
    return str(redis_server.url)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    c.flushall()
    yield c
    c.close()


def make_provider(processor: TraceStoreProcessor) -> TracerProvider:
    provider = TracerProvider(id_generator=SequentialIds())
    provider.add_span_processor(processor)
    return provider


def record_job(provider: TracerProvider, job_id: str, model: str, start_ns: int) -> None:
    """A small job-shaped trace: gateway call > replica run > two canvases with step events."""
    tracer = provider.get_tracer("test")
    attrs = {Attr.JOB_ID: job_id, Attr.GEN_AI_REQUEST_MODEL: model}
    root = tracer.start_span(SpanName.gateway("Generate"), attributes=attrs, start_time=start_ns)
    from opentelemetry import trace

    ctx = trace.set_span_in_context(root)
    run = tracer.start_span(SpanName.REPLICA_RUN, context=ctx, attributes=attrs, start_time=start_ns + 10**6)
    run_ctx = trace.set_span_in_context(run)
    for index in range(2):
        begin = start_ns + (2 + 5 * index) * 10**6
        canvas = tracer.start_span(
            SpanName.ENGINE_CANVAS, context=run_ctx, attributes={Attr.CANVAS_INDEX: index}, start_time=begin
        )
        for step in range(3):
            canvas.add_event(SpanName.STEP_EVENT, {Attr.STEP: step, Attr.ACCEPTED: 10 * (step + 1)}, begin + step)
        canvas.end(end_time=begin + 5 * 10**6)
    run.end(end_time=start_ns + 12 * 10**6)
    root.end(end_time=start_ns + 13 * 10**6)


def test_a_finished_trace_is_kept_and_found_by_job_or_trace_id(client: redis.Redis):
    processor = TraceStoreProcessor(client, retention_s=3600, clock=lambda: NOW)
    provider = make_provider(processor)
    start = int(NOW * 1e9) - 10**9
    record_job(provider, "job-a", "tiny", start)
    assert processor.force_flush(5_000)
    store = TraceStore(client)
    spans = store.get_trace("job-a")
    assert [s.name for s in spans] == [
        "gateway.Generate",
        SpanName.REPLICA_RUN,
        SpanName.ENGINE_CANVAS,
        SpanName.ENGINE_CANVAS,
    ]
    trace_id = f"{1:032x}"
    assert {s.trace_id for s in spans} == {trace_id}
    assert store.get_trace(trace_id) == spans
    root, run, c0, c1 = spans
    assert root.parent_id is None and run.parent_id == root.span_id
    assert c0.parent_id == run.span_id and c1.parent_id == run.span_id
    assert c1.attributes[Attr.CANVAS_INDEX] == 1
    assert [e.attributes[Attr.ACCEPTED] for e in c1.events] == [10, 20, 30]
    assert root.duration_s == pytest.approx(0.013)
    assert SpanRecord.from_json(c1.to_json()) == c1
    assert store.get_trace("no-such-job") == []
    provider.shutdown()


def test_recent_traces_are_newest_first_and_filter_by_model_and_time(client: redis.Redis):
    processor = TraceStoreProcessor(client, retention_s=3600, clock=lambda: NOW)
    provider = make_provider(processor)
    base = int(NOW * 1e9) - 600 * 10**9
    for i, model in enumerate(["tiny", "big", "tiny"]):
        record_job(provider, f"job-{i}", model, base + i * 60 * 10**9)
    assert processor.force_flush(5_000)
    store = TraceStore(client)
    ids = [f"{n:032x}" for n in (1, 2, 3)]
    assert store.recent_traces() == ids[::-1]
    assert store.recent_traces(model="tiny") == [ids[2], ids[0]]
    assert store.recent_traces(limit=1) == [ids[2]]
    assert store.recent_traces(since=base / 1e9 + 30) == [ids[2], ids[1]]
    provider.shutdown()


def test_old_traces_go_and_recent_ones_stay(client: redis.Redis):
    processor = TraceStoreProcessor(client, retention_s=3600, clock=lambda: NOW)
    provider = make_provider(processor)
    now_ns = int(NOW * 1e9)
    record_job(provider, "old", "tiny", now_ns - 2 * HOUR_NS)  # ended two hours ago: past retention
    record_job(provider, "recent", "tiny", now_ns - HOUR_NS // 2)
    assert processor.force_flush(5_000)
    store = TraceStore(client)
    assert store.get_trace("old") == []
    assert len(store.get_trace("recent")) == 4
    assert store.recent_traces() == [f"{2:032x}"]
    assert store.recent_traces(model="tiny") == [f"{2:032x}"]
    ttl_ms = client.pttl(f"bp:traces:spans:{2:032x}")
    assert ttl_ms > 0, "a kept trace still expires"
    provider.shutdown()


def test_an_unreachable_store_drops_and_counts(tmp_path: Path):
    processor = TraceStoreProcessor.from_url(
        f"unix://{tmp_path / 'nobody-listens.sock'}", retention_s=60, max_buffer=50, flush_interval_s=0.05
    )
    provider = make_provider(processor)
    tracer = provider.get_tracer("test")
    for i in range(2_000):
        tracer.start_span("work", attributes={Attr.JOB_ID: f"j{i}"}).end()
    assert processor.force_flush(10_000)
    assert processor.written == 0
    assert processor.dropped == 2_000, "every span is either dropped at the buffer or lost in a failed write"
    provider.shutdown()


def test_a_store_that_hangs_never_blocks_the_thread_ending_spans():
    # A listening socket that never answers: the writer's first command waits forever (no socket
    # timeout). If ending a span ever waited on the store, this test would hang and time out.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    client = redis.Redis(port=hole.getsockname()[1], socket_timeout=None, retry=Retry(NoBackoff(), 0))
    processor = TraceStoreProcessor(client, retention_s=60, max_buffer=50, batch_size=10, flush_interval_s=0.01)
    provider = make_provider(processor)
    tracer = provider.get_tracer("test")
    try:
        for i in range(2_000):
            tracer.start_span("work", attributes={Attr.JOB_ID: f"j{i}"}).end()
        assert processor.written == 0
        # At most a full buffer waits, plus the one batch the stuck writer holds; the rest is counted.
        assert 2_000 - 50 - 10 <= processor.dropped < 2_000
        assert processor.force_flush(100) is False, "a flush reports that it could not finish"
    finally:
        hole.close()  # the writer's read fails now, so shutdown can join it
        client.connection_pool.disconnect()
        provider.shutdown()


def test_every_span_is_written_when_the_store_keeps_up(client: redis.Redis):
    processor = TraceStoreProcessor(client, retention_s=60, max_buffer=100_000, batch_size=256)
    provider = make_provider(processor)
    tracer = provider.get_tracer("test")
    for i in range(2_000):
        tracer.start_span("work", attributes={Attr.JOB_ID: f"j{i}"}).end()
    # Generous: the session's redis-server fsyncs every write, and this machine is shared.
    assert processor.force_flush(60_000)
    assert processor.written == 2_000 and processor.dropped == 0
    assert client.hlen(f"bp:traces:spans:{2000:032x}") == 1
    assert client.get("bp:traces:job:j1999") == f"{2000:032x}".encode()
    provider.shutdown()


def test_an_expiry_is_only_ever_extended_by_a_later_batch(client: redis.Redis):
    processor = TraceStoreProcessor(client, retention_s=3600, clock=lambda: NOW)
    provider = make_provider(processor)
    tracer = provider.get_tracer("test")
    from opentelemetry import trace

    now_ns = int(NOW * 1e9)
    attrs = {Attr.JOB_ID: "job-x", Attr.GEN_AI_REQUEST_MODEL: "tiny"}
    root = tracer.start_span("root", attributes=attrs, start_time=now_ns - 60 * 10**9)
    root.end(end_time=now_ns - 10**9)
    assert processor.force_flush(5_000)
    # Exported later (another process, a slower exporter), but ended earlier than the root.
    child = tracer.start_span(
        "child", context=trace.set_span_in_context(root), attributes=attrs, start_time=now_ns - 50 * 10**9
    )
    child.end(end_time=now_ns - 40 * 10**9)
    assert processor.force_flush(5_000)
    expected = (now_ns - 10**9) // 10**6 + 3600 * 1000
    trace_id = f"{1:032x}"
    assert client.hlen(f"bp:traces:spans:{trace_id}") == 2
    assert client.pexpiretime(f"bp:traces:spans:{trace_id}") == expected, "the newest span's end, not the last write's"
    assert client.pexpiretime("bp:traces:job:job-x") == expected
    assert client.get("bp:traces:job:job-x") == trace_id.encode()
    provider.shutdown()


def test_a_batch_larger_than_a_script_call_is_written_whole(client: redis.Redis):
    from opentelemetry import trace

    from blockpress.runtime.tracing.store import _CHUNK

    size = 2 * _CHUNK + 100  # three script calls, one trace across all of them
    processor = TraceStoreProcessor(client, retention_s=3600, batch_size=size, flush_interval_s=60, clock=lambda: NOW)
    provider = make_provider(processor)
    tracer = provider.get_tracer("test")
    now_ns = int(NOW * 1e9)
    attrs = {Attr.JOB_ID: "job-big", Attr.GEN_AI_REQUEST_MODEL: "tiny"}
    root = tracer.start_span("root", attributes=attrs, start_time=now_ns - 100 * 10**9)
    ctx = trace.set_span_in_context(root)
    for i in range(size - 1):
        # The first child to end (in the first call) ends last; the root, ended last (in the last
        # call), started first: both must win over the calls in between.
        child = tracer.start_span("child", context=ctx, attributes=attrs, start_time=now_ns - 90 * 10**9 + i)
        child.end(end_time=now_ns - (2 if i == 0 else 30) * 10**9)
    root.end(end_time=now_ns - 20 * 10**9)
    assert processor.force_flush(30_000)
    assert processor.written == size and processor.dropped == 0
    trace_id = f"{1:032x}"
    assert client.hlen(f"bp:traces:spans:{trace_id}") == size
    assert client.pexpiretime(f"bp:traces:spans:{trace_id}") == (now_ns - 2 * 10**9) // 10**6 + 3600 * 1000
    assert client.zscore("bp:traces:recent", trace_id) == pytest.approx((now_ns - 100 * 10**9) / 1e9)
    assert client.zscore("bp:traces:recent:tiny", trace_id) == pytest.approx((now_ns - 100 * 10**9) / 1e9)
    assert TraceStore(client).get_trace("job-big")[0].name == "root"
    provider.shutdown()


@pytest.mark.parametrize("parent_id", [None, "2" * 16])
@pytest.mark.parametrize("value", [float("nan"), float("-inf"), 2**70, "é \ud800", [None, 1.5], "null", 1e-05])
def test_span_json_reads_back_as_json_writes_it(parent_id: str | None, value: Any):
    record = SpanRecord("0" * 32, "1" * 16, parent_id, "n", 1, 2, attributes={"v": value})
    expected = SpanRecord.from_json(json.dumps(record.to_dict()))
    assert repr(SpanRecord.from_json(record.to_json())) == repr(expected)  # repr: NaN is not equal to itself


def test_a_failed_script_call_loses_its_spans_and_the_later_ones_only(client: redis.Redis):
    from blockpress.runtime.tracing.store import _CHUNK

    size = 2 * _CHUNK + 100  # three script calls; the second fails
    processor = TraceStoreProcessor(client, retention_s=3600, batch_size=size, flush_interval_s=60, clock=lambda: NOW)
    calls = 0
    write_chunk = processor._write_chunk

    def second_fails(spans: Any, horizon: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise redis.ConnectionError("gone for this call")
        write_chunk(spans, horizon)

    processor._write_chunk = second_fails  # type: ignore[method-assign]
    provider = make_provider(processor)
    tracer = provider.get_tracer("test")
    for i in range(size):
        tracer.start_span(f"s{i}", attributes={Attr.JOB_ID: f"job-{i}"}).end()
    assert processor.force_flush(30_000)
    # The first call's spans are kept and counted written; the failed call's and the rest are counted lost.
    assert (processor.written, processor.dropped) == (_CHUNK, size - _CHUNK)
    assert calls == 2
    assert TraceStore(client).get_trace("job-0") and not TraceStore(client).get_trace(f"job-{_CHUNK}")
    provider.shutdown()
