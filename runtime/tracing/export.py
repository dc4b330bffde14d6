"""One trace as Chrome trace-event JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open.

Each span is a complete ("X") event; each denoising step is one too, nested inside its canvas, with its
decoder and sampler parts nested inside it, so the viewer's flame chart shows where a step's time went.
Spans go on one track per stage family (gateway, queue, replica, agent, engine): spans of a family
follow one another in a job, so a track never holds two overlapping slices that do not nest.
Times are microseconds from the trace's start; the absolute start is in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.store import SpanRecord

__all__ = ["to_chrome"]

_TRACKS = ("gateway", "queue", "replica", "agent", "engine")


def _track(name: str) -> int:
    family = name.split(".", 1)[0]
    return _TRACKS.index(family) + 1 if family in _TRACKS else len(_TRACKS) + 1


def to_chrome(spans: Sequence[SpanRecord]) -> str:
    """The trace-event JSON document of one trace's spans."""
    if not spans:
        return json.dumps({"traceEvents": []})
    origin = min(s.start_ns for s in spans)
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": f"trace {spans[0].trace_id}"}},
    ]
    for tid, name in enumerate((*_TRACKS, "other"), 1):
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid, "args": {"sort_index": tid}})

    def us(ns: int) -> float:
        return round((ns - origin) / 1e3, 3)

    for s in sorted(spans, key=lambda s: (s.start_ns, -s.end_ns)):
        tid = _track(s.name)
        args = {**s.attributes, "span_id": s.span_id, "parent_id": s.parent_id, "status": s.status}
        label = s.name
        if s.name == SpanName.ENGINE_CANVAS and Attr.CANVAS_INDEX in s.attributes:
            label = f"{s.name} #{s.attributes[Attr.CANVAS_INDEX]}"
        events.append(_slice(label, s.name, tid, us(s.start_ns), us(s.end_ns), args))
        if s.name == SpanName.ENGINE_CANVAS:
            events += _steps(s, tid, us)
    other = {"trace_id": spans[0].trace_id, "start_epoch_ns": origin}
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}, separators=(",", ":"))


def _slice(name: str, cat: str, tid: int, start_us: float, end_us: float, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "X", "name": name, "cat": cat, "pid": 1, "tid": tid, "ts": start_us,
            "dur": round(end_us - start_us, 3), "args": args}  # fmt: skip


def _steps(canvas: SpanRecord, tid: int, us: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in canvas.events:
        if e.name != SpanName.STEP_EVENT or Attr.STEP_MS not in e.attributes:
            continue
        a = e.attributes
        # A step event is stamped when the step ended; the slice is clamped into its canvas.
        end = min(e.time_ns, canvas.end_ns)
        # Integer nanoseconds: epoch times as floats are only good to a quarter of a microsecond.
        start = max(canvas.start_ns, end - round(float(a[Attr.STEP_MS]) * 1e6))
        out.append(_slice(f"step {a.get(Attr.STEP, '')}", "step", tid, us(start), us(end), dict(a)))
        if Attr.DECODER_MS in a:
            split = min(end, start + round(float(a[Attr.DECODER_MS]) * 1e6))
            for name, b, f in (("decoder", start, split), ("sampler", split, end)):
                out.append(_slice(name, "step", tid, us(b), us(f), {}))
    return out
