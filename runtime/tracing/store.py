"""The BlockPress trace store: finished spans kept in Redis per trace, so inspection needs no collector.

Writing happens off the hot path. `TraceStoreProcessor.on_end` only appends the finished span to a
bounded buffer; a background thread turns spans into JSON and writes each batch with one call of the
Lua script `store.lua` (per chunk of `_CHUNK` spans), which does every key's update in Redis: packing
several commands per span was most of that thread's CPU, in processes where it shares the GIL with
the gateway or the engine. When the buffer is full (Redis slow or gone) spans are dropped and counted,
never waited for: a job must not slow down or fail because its trace could not be kept.

Layout (prefix `bp:traces`, which `blockpress.runtime.contracts.keys` reserves), every key expiring
`retention_s` after the newest span it holds ended (an expiry is set when a key has none and only ever
extended, so a trace's spans may arrive in any order and in any number of batches):

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
from importlib import resources
from typing import Any, Final

import orjson
import redis
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from redis.backoff import NoBackoff
from redis.retry import Retry

from blockpress.runtime.tracing.names import Attr

__all__ = ["SpanEventRecord", "SpanRecord", "TraceStore", "TraceStoreProcessor"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "bp:traces"

_CHUNK: Final = 512
"""Spans per script call: a whole default batch, and well under the ~8,000 values Lua's `unpack`
can spread into one command (a chunk's HSET or ZADD takes at most two per span)."""


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
        return cls.from_dict(_span_dict(span))

    def to_dict(self) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: asdict deep-copies every value.
        out = {f: getattr(self, f) for f in _RECORD_FIELDS}
        out["events"] = [{"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes} for e in self.events]
        return out

    def to_json(self) -> str:
        return _dumps(self.to_dict()).decode()

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


def _span_dict(span: ReadableSpan) -> dict[str, Any]:
    # `SpanRecord.to_dict`'s layout straight from the span, so that the writer thread builds no
    # SpanRecord (a frozen dataclass costs as much to make as the JSON to write); `from_span` goes
    # through it too, so a field named wrongly here fails there.
    ctx = span.context
    assert ctx is not None
    parent = span.parent
    status = span.status
    start = span.start_time or 0
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": None if parent is None else f"{parent.span_id:016x}",
        "name": span.name,
        "start_ns": start,
        "end_ns": span.end_time or start,
        "service": str(span.resource.attributes.get("service.name", "")),
        "kind": span.kind.name,
        "status": status.status_code.name,
        "status_message": status.description or "",
        "attributes": _plain(span.attributes),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": _plain(e.attributes)} for e in span.events],
    }


_JSON: Final = json.JSONEncoder(separators=(",", ":"))


def _dumps(d: dict[str, Any]) -> bytes:
    """A span dict as JSON: orjson (a tenth of json's time), json where the two would read back apart."""
    try:
        out = orjson.dumps(d)
    except TypeError:  # orjson refuses ints past 64 bits and lone surrogates; json writes both
        return _JSON.encode(d).encode()
    # orjson writes NaN and infinities as null, json as NaN and Infinity, which it reads back as floats.
    # Any null beyond a root's parent id may be one (or is None in a list, or the word in a string):
    # json then decides, at json's cost, for what is rare.
    if out.count(b"null") > (d["parent_id"] is None):
        return _JSON.encode(d).encode()
    return out


_WRITE_SCRIPT: Final = resources.files(__package__).joinpath("store.lua").read_text()


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
        batch_size: spans per write; a full batch wakes the writer early.
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
        self._script = client.register_script(_WRITE_SCRIPT)
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
                lost = self._write(batch)
                self.dropped += lost
                self._lost += lost
                with self._idle:
                    self._idle.notify_all()

    def _write(self, spans: Sequence[ReadableSpan]) -> int:
        """Writes `spans` a script call at a time; the number not written (those from a failed call on)."""
        horizon = f"({self._clock() - self._retention_ms / 1000}"
        for at in range(0, len(spans), _CHUNK):
            try:
                self._write_chunk(spans[at : at + _CHUNK], horizon)
            except Exception as exc:  # the store is best-effort; it must never take the process down
                log.warning("trace store: %d spans not written: %s", len(spans) - at, exc)
                return len(spans) - at
            self.written += len(spans[at : at + _CHUNK])
        return 0

    def _write_chunk(self, spans: Sequence[ReadableSpan], horizon: str) -> None:
        keys, retention_ms = self._keys, self._retention_ms
        args: list[str | bytes | int | float] = [keys.prefix, horizon]
        traces: set[str] = set()
        jobs: set[str] = set()
        models: set[str] = set()
        for span in spans:
            d = _span_dict(span)
            trace_id, attributes = d["trace_id"], d["attributes"]
            job = attributes.get(Attr.JOB_ID)
            model = attributes.get(Attr.GEN_AI_REQUEST_MODEL)
            job = job if isinstance(job, str) else ""
            model = model if isinstance(model, str) else ""
            expire_at = d["end_ns"] // 1_000_000 + retention_ms
            args += (trace_id, d["span_id"], _dumps(d), expire_at, d["start_ns"] / 1e9, job, model)
            traces.add(trace_id)
            jobs.add(job)
            models.add(model)
        jobs.discard("")  # store.lua reads an empty job id or model as none
        models.discard("")
        declared = [keys.recent(), *map(keys.spans, traces), *map(keys.job, jobs), *map(keys.recent, models)]
        self._script(keys=declared, args=args)


def _fail_fast_client(url: str) -> redis.Redis:
    # redis-py retries a refused connection with backoff for seconds by default; the next batch (or
    # the user's next command) is the retry here.
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0, retry=Retry(NoBackoff(), 0))


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
