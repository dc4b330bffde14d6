"""Renders one job's trace for a person: a terminal waterfall, a per-canvas table, JSON (the page: `page.py`).

Input is the trace store's `SpanRecord`s of one trace, in any order. Spans are nested by parent id;
a span whose parent is not in the trace (the client's own span, say) is drawn as a root.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.store import SpanRecord

__all__ = [
    "CanvasView",
    "Stage",
    "canvases",
    "label",
    "largest_stage",
    "render_text",
    "span_tree",
    "stage_times",
    "to_json",
]

_SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True, slots=True)
class CanvasView:
    """How one canvas converged, read back from its `engine.canvas` span."""

    index: int
    steps: int
    max_steps: int
    tokens: int
    duration_ms: float
    step_ms: list[float] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    mean_entropy: list[float] = field(default_factory=list)
    decoder_ms: list[float] = field(default_factory=list)
    """The decoder forward's part of each step, where the engine reported it."""

    @property
    def ms_per_step(self) -> float:
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else self.duration_ms / max(1, self.steps)


@dataclass(frozen=True, slots=True)
class Stage:
    """Time spent in spans of one name that no child span accounts for (self time)."""

    name: str
    spans: int
    seconds: float
    share: float
    """Of the whole trace, 0..1."""


def label(span: SpanRecord) -> str:
    """The name a person reads: the span name, with the canvas index, tool name or turn."""
    a = span.attributes
    if span.name == SpanName.ENGINE_CANVAS and Attr.CANVAS_INDEX in a:
        return f"{span.name} #{a[Attr.CANVAS_INDEX]}"
    if span.name == SpanName.AGENT_TOOL and Attr.GEN_AI_TOOL_NAME in a:
        return f"{span.name} {a[Attr.GEN_AI_TOOL_NAME]}"
    if span.name == SpanName.AGENT_TURN and Attr.TURN_INDEX in a:
        return f"{span.name} {a[Attr.TURN_INDEX]}"
    return span.name


def span_tree(spans: Sequence[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """Spans in display order (depth first, siblings by start time) with their depth."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        children[s.parent_id if s.parent_id in ids else None].append(s)
    out: list[tuple[int, SpanRecord]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, ()), key=lambda s: (s.start_ns, -s.end_ns)):
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return out


def _bounds(spans: Sequence[SpanRecord]) -> tuple[int, int]:
    start = min(s.start_ns for s in spans)
    return start, max(max(s.end_ns for s in spans), start + 1)


def _covered(intervals: list[tuple[int, int]]) -> int:
    total, reach = 0, None
    for begin, end in sorted(intervals):
        if reach is None or begin > reach:
            total += end - begin
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def stage_times(spans: Sequence[SpanRecord]) -> dict[str, tuple[int, int]]:
    """Per span name: how many spans, and their self time in ns (what no child span accounts for)."""
    kids: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for s in spans:
        if s.parent_id is not None:
            kids[s.parent_id].append((s.start_ns, s.end_ns))
    out: dict[str, tuple[int, int]] = {}
    for s in spans:
        clipped = [(max(b, s.start_ns), min(e, s.end_ns)) for b, e in kids.get(s.span_id, ()) if e > s.start_ns]
        count, total = out.get(s.name, (0, 0))
        out[s.name] = (count + 1, total + max(0, (s.end_ns - s.start_ns) - _covered(clipped)))
    return out


def largest_stage(spans: Sequence[SpanRecord]) -> Stage | None:
    """The span name with the most self time: where a tuning effort should start."""
    if not spans:
        return None
    start, end = _bounds(spans)
    times = stage_times(spans)
    name = max(times, key=lambda n: times[n][1])
    count, self_ns = times[name]
    return Stage(name, count, self_ns / 1e9, self_ns / (end - start))


def canvases(spans: Sequence[SpanRecord]) -> list[CanvasView]:
    """Every canvas of the trace, in the order they ran."""
    out: list[CanvasView] = []
    for s in sorted((s for s in spans if s.name == SpanName.ENGINE_CANVAS), key=lambda s: s.start_ns):
        a = s.attributes
        steps = [e.attributes for e in s.events if e.name == SpanName.STEP_EVENT]
        out.append(
            CanvasView(
                index=int(a.get(Attr.CANVAS_INDEX, len(out))),
                steps=int(a.get(Attr.CANVAS_STEPS, len(steps))),
                max_steps=int(a.get(Attr.CANVAS_MAX_STEPS, 0)),
                tokens=int(a.get(Attr.CANVAS_TOKENS, 0)),
                duration_ms=s.duration_s * 1e3,
                step_ms=[float(e[Attr.STEP_MS]) for e in steps if Attr.STEP_MS in e],
                accepted=[int(e[Attr.ACCEPTED]) for e in steps if Attr.ACCEPTED in e],
                mean_entropy=[float(e[Attr.MEAN_ENTROPY]) for e in steps if Attr.MEAN_ENTROPY in e],
                decoder_ms=[float(e[Attr.DECODER_MS]) for e in steps if Attr.DECODER_MS in e],
            )
        )
    return out


def _spark(values: Sequence[float]) -> str:
    if not values:
        return ""
    top = max(values) or 1
    return "".join(_SPARK[min(len(_SPARK) - 1, int(v / top * (len(_SPARK) - 1) + 0.5))] for v in values)


def _job_id(spans: Sequence[SpanRecord]) -> str:
    return next((str(s.attributes[Attr.JOB_ID]) for s in spans if Attr.JOB_ID in s.attributes), "")


def render_text(spans: Sequence[SpanRecord], *, width: int = 48) -> str:
    """The waterfall, the per-canvas table and the largest stage, for a terminal."""
    if not spans:
        return "no spans"
    start, end = _bounds(spans)
    total = end - start
    rows = span_tree(spans)
    label_w = max(len("  " * d + label(s)) for d, s in rows)
    lines = [
        f"trace {spans[0].trace_id}  job {_job_id(spans) or '-'}  {total / 1e6:.1f} ms  {len(spans)} spans",
        f"{'span':<{label_w}}  {'start':>9}  {'duration':>10}  {'share':>5}  axis 0..{total / 1e6:.1f} ms",
    ]
    for depth, s in rows:
        left = int((s.start_ns - start) / total * width)
        length = max(1, round((s.end_ns - s.start_ns) / total * width))
        bar = (" " * left + "█" * length)[:width].ljust(width)
        mark = "!" if s.status == "ERROR" else " "
        lines.append(
            f"{'  ' * depth + label(s):<{label_w}}  {(s.start_ns - start) / 1e6:7.1f}ms"
            f"  {s.duration_s * 1e3:8.1f}ms  {(s.end_ns - s.start_ns) / total:5.0%} {mark}│{bar}│"
        )
    views = canvases(spans)
    if views:
        lines += ["", f"{'canvas':>6}  {'steps':>9}  {'ms/step':>8}  {'tokens':>6}  acceptance by step"]
        for c in views:
            limit = f"{c.steps}/{c.max_steps}" if c.max_steps else str(c.steps)
            growth = f"{_spark(c.accepted)} " + " ".join(str(a) for a in c.accepted)
            lines.append(f"{c.index:>6}  {limit:>9}  {c.ms_per_step:8.2f}  {c.tokens:>6}  {growth}")
    stage = largest_stage(spans)
    if stage is not None:
        times = f" ({stage.spans} spans)" if stage.spans > 1 else ""
        lines += [
            "",
            f"largest stage: {stage.name}{times}, {stage.seconds * 1e3:.1f} ms, {stage.share:.0%} of the job",
        ]
    return "\n".join(lines)


def to_json(spans: Sequence[SpanRecord]) -> str:
    """The spans and the derived figures, for tools."""
    stage = largest_stage(spans)
    start, end = _bounds(spans) if spans else (0, 0)
    doc = {
        "trace_id": spans[0].trace_id if spans else None,
        "job_id": _job_id(spans) or None,
        "duration_ms": (end - start) / 1e6,
        "largest_stage": None
        if stage is None
        else {"name": stage.name, "seconds": stage.seconds, "share": stage.share},
        "spans": [s.to_dict() for s in sorted(spans, key=lambda s: s.start_ns)],
    }
    return json.dumps(doc, indent=2)
