"""The BlockPress trace store: finished spans kept in Redis per trace, so inspection needs no collector.

Writing happens off the hot path. `TraceStoreProcessor.on_end` only appends the finished span to a
bounded buffer; a background thread turns spans into JSON and writes them in pipelined batches. When
the buffer is full (Redis slow or gone) spans are dropped and counted, never waited for: a job must not
slow down or fail because its trace could not be kept.

Layout (prefix `bp:traces`, which `blockpress.runtime.contracts.keys` reserves), every key expiring
`retention_s` after the newest span it holds ended:

- `{prefix}:spans:{trace_id}`: hash, span id -> span JSON (idempotent under re-export);
- `{prefix}:job:{job_id}`: the trace id of a job, from spans carrying `blockpress.job.id`;
- `{prefix}:recent` and `{prefix}:recent:{model}`: sorted sets of trace ids scored by start time,
  trimmed to the retention window on every write.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

import redis
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from redis.backoff import NoBackoff
from redis.retry import Retry

from blockpress.runtime.tracing.names import Attr

__all__ = ["SpanEventRecord", "SpanRecord", "TraceStore", "TraceStoreProcessor"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "bp:traces"


@dataclass(frozen=True, slots=True)
class SpanEventRecord:
    """One span event (a denoising step on `engine.canvas`)."""

    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """A finished span as the trace store keeps it: plain data, JSON in Redis, `--json` on the CLI."""

    trace_id: str
    """32 lowercase hex digits, as W3C traceparent writes it."""
    span_id: str
    """16 lowercase hex digits."""
    parent_id: str | None
    name: str
    start_ns: int
    """Epoch nanoseconds."""
    end_ns: int
    service: str = ""
    kind: str = "INTERNAL"
    status: str = "UNSET"
    """UNSET, OK or ERROR."""
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[SpanEventRecord] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @classmethod
    def from_span(cls, span: ReadableSpan) -> SpanRecord:
        ctx = span.context
        assert ctx is not None
        parent = span.parent
        return cls(
            trace_id=f"{ctx.trace_id:032x}",
            span_id=f"{ctx.span_id:016x}",
            parent_id=None if parent is None else f"{parent.span_id:016x}",
            name=span.name,
            start_ns=span.start_time or 0,
            end_ns=span.end_time or span.start_time or 0,
            service=str(span.resource.attributes.get("service.name", "")),
            kind=span.kind.name,
            status=span.status.status_code.name,
            status_message=span.status.description or "",
            attributes=_plain(span.attributes),
            events=[SpanEventRecord(e.name, e.timestamp, _plain(e.attributes)) for e in span.events],
        )

    def to_dict(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: asdict deep-copies every value, and the gateway's writer
        # thread serializes one span per call (a quarter of the gateway's CPU under a submit burst).
        out = {f: getattr(self, f) for f in _RECORD_FIELDS}
        out["events"] = [{"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes} for e in self.events]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpanRecord:
        events = [SpanEventRecord(**e) for e in d.get("events", ())]
        return cls(**{**d, "events": events})

    @classmethod
    def from_json(cls, raw: str | bytes) -> SpanRecord:
        return cls.from_dict(json.loads(raw))


_RECORD_FIELDS: Final = tuple(f.name for f in fields(SpanRecord) if f.name != "events")


def _plain(attributes: Any) -> dict[str, Any]:
    # OpenTelemetry hands out immutable mappings with tuple values; JSON wants dicts and lists.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (attributes or {}).items()}


class _Keys:
    """Key names of the trace store (separate from the job queue's, since it may live elsewhere)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def spans(self, trace_id: str) -> str:
        return f"{self.prefix}:spans:{trace_id}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def run(self, label: str) -> str:
        return f"{self.prefix}:run:{label}"

    def recent(self, model: str | None = None) -> str:
        return f"{self.prefix}:recent" if model is None else f"{self.prefix}:recent:{model}"


class TraceStoreProcessor(SpanProcessor):
    """A span processor that keeps finished spans in Redis, written by a background thread.

    Args:
        client: a synchronous Redis client; only the writer thread uses it.
        retention_s: how long a trace is kept after its newest span ended.
        max_buffer: spans held for writing; past it new spans are dropped and counted in `dropped`.
        batch_size: spans per pipelined write; a full batch wakes the writer early.
        flush_interval_s: the longest a finished span waits before it is written.
        clock: epoch seconds, for trimming the recent-trace indexes (tests pass a fixed clock).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_s: float,
        max_buffer: int = 20_000,
        batch_size: int = 512,
        flush_interval_s: float = 0.5,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._retention_ms = int(retention_s * 1000)
        self._max_buffer = max_buffer
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._keys = _Keys(prefix)
        self._clock = clock
        self._buffer: deque[ReadableSpan] = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._stopping = False
        self.dropped = 0
        """Spans not kept: dropped with the buffer full, or lost with a failed write."""
        self.written = 0
        self._lost = 0  # spans taken from the buffer whose write failed (also counted in `dropped`)
        self._enqueued = 0
        self._thread = threading.Thread(target=self._run, name="blockpress-tracestore", daemon=True)
        self._thread.start()

    @classmethod
    def from_url(cls, url: str, **kwargs: float | int | str) -> TraceStoreProcessor:
        """A processor on its own connection that fails fast: a dead store must not pin the writer."""
        return cls(_fail_fast_client(url), **kwargs)  # type: ignore[arg-type]

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        # The hot path: called on the thread that ended the span, so it only counts and appends.
        if len(self._buffer) >= self._max_buffer or self._stopping:
            self.dropped += 1
            return
        self._buffer.append(span)
        self._enqueued += 1
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Write everything buffered before this call; False when that took longer than the timeout."""
        target = self._enqueued
        deadline = time.monotonic() + timeout_millis / 1000
        self._wake.set()
        with self._idle:
            while self.written + self._lost < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._idle.wait(min(left, self._interval))
                self._wake.set()
        return True

    def shutdown(self) -> None:
        self.force_flush(timeout_millis=5_000)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            while self._buffer:
                batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
                try:
                    self._write([SpanRecord.from_span(s) for s in batch])
                    self.written += len(batch)
                except Exception as exc:  # the store is best-effort; it must never take the process down
                    self.dropped += len(batch)
                    self._lost += len(batch)
                    log.warning("trace store: %d spans not written: %s", len(batch), exc)
                with self._idle:
                    self._idle.notify_all()

    def _write(self, records: Sequence[SpanRecord]) -> None:
        keys = self._keys
        pipe = self._client.pipeline(transaction=False)
        touched: set[str] = {keys.recent()}
        for r in records:
            expire_at = r.end_ns // 1_000_000 + self._retention_ms
            start_s = r.start_ns / 1e9
            pipe.hset(keys.spans(r.trace_id), r.span_id, r.to_json())
            _expire(pipe, keys.spans(r.trace_id), expire_at)
            job_id = r.attributes.get(Attr.JOB_ID)
            if isinstance(job_id, str):
                pipe.set(keys.job(job_id), r.trace_id)
                _expire(pipe, keys.job(job_id), expire_at)
            # LT: a trace is indexed by its earliest span, whichever order its spans arrive in.
            pipe.zadd(keys.recent(), {r.trace_id: start_s}, lt=True)
            model = r.attributes.get(Attr.GEN_AI_REQUEST_MODEL)
            if isinstance(model, str):
                pipe.zadd(keys.recent(model), {r.trace_id: start_s}, lt=True)
                touched.add(keys.recent(model))
        horizon = self._clock() - self._retention_ms / 1000
        for key in touched:
            pipe.zremrangebyscore(key, "-inf", f"({horizon}")
        pipe.execute()


def _fail_fast_client(url: str) -> redis.Redis:
    # redis-py retries a refused connection with backoff for seconds by default; the next batch (or
    # the user's next command) is the retry here.
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, retry=Retry(NoBackoff(), 0))


def _expire(pipe: redis.client.Pipeline, key: str, at_ms: int) -> None:
    # NX gives a fresh key its expiry, GT only ever extends it, so spans may arrive in any order.
    pipe.pexpireat(key, at_ms, nx=True)
    pipe.pexpireat(key, at_ms, gt=True)


class TraceStore:
    """Reads traces the processor kept. Synchronous: async callers use `asyncio.to_thread`."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = client
        self._keys = _Keys(prefix)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> TraceStore:
        return cls(_fail_fast_client(url), prefix=prefix)

    def trace_id_of(self, job_or_trace_id: str) -> str | None:
        """The trace id of a job id, or the argument itself when it names a stored trace."""
        found = self._client.get(self._keys.job(job_or_trace_id))
        if found is not None:
            return found.decode() if isinstance(found, bytes) else str(found)
        if self._client.exists(self._keys.spans(job_or_trace_id)):
            return job_or_trace_id
        return None

    def get_trace(self, job_or_trace_id: str) -> list[SpanRecord]:
        """The spans of a job's (or a trace id's) trace ordered by start time; empty when none is kept."""
        trace_id = self.trace_id_of(job_or_trace_id)
        if trace_id is None:
            return []
        raw = self._client.hvals(self._keys.spans(trace_id))
        return sorted((SpanRecord.from_json(v) for v in raw), key=lambda r: (r.start_ns, -r.end_ns))

    def save_run(self, label: str, summary: dict[str, Any]) -> None:
        """Keep a labelled `trace stats` summary (no expiry: it is small and outlives its traces)."""
        self._client.set(self._keys.run(label), json.dumps(summary))

    def load_run(self, label: str) -> dict[str, Any] | None:
        raw = self._client.get(self._keys.run(label))
        return None if raw is None else dict(json.loads(raw))

    def recent_traces(
        self, limit: int = 20, *, model: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[str]:
        """Trace ids, newest first, optionally only one model's, started after `since` and before `until`."""
        low = "-inf" if since is None else f"({since}"
        high = "+inf" if until is None else f"({until}"
        ids = self._client.zrevrangebyscore(self._keys.recent(model), high, low, start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
