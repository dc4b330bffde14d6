"""Figures across many jobs' traces: percentiles per stage, the dominant stage and what usually helps.

`summarize` reads the spans of each trace and reports, over all of them, p50/p95/p99 of:

- queue wait (all `queue.wait` spans of a job), time to first canvas (trace start to the end of the
  first `engine.canvas`), prefill (all `engine.prefill` spans of a job), end-to-end (the trace);
- ms per denoising step (every step event), steps per canvas (every canvas), tool time (every
  `agent.tool` span);
- tokens per second: tokens committed over the job's engine time (first engine span start to last
  canvas end), i.e. generation speed, which is what settings change; queueing shows up in end-to-end.

The dominant stage is the span name with the most self time summed over all traces.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from blockpress.runtime.tracing.names import SpanName
from blockpress.runtime.tracing.store import SpanRecord
from blockpress.runtime.tracing.view import canvases, stage_times

__all__ = ["Percentiles", "Summary", "render_comparison", "render_summary", "summarize"]

# The figures in display order, with their units.
FIGURES: dict[str, str] = {
    "queue_wait": "ms",
    "time_to_first_canvas": "ms",
    "prefill": "ms",
    "ms_per_step": "ms",
    "steps_per_canvas": "steps",
    "tool_time": "ms",
    "end_to_end": "ms",
    "tokens_per_s": "tok/s",
}

ADVICE: dict[str, str] = {
    SpanName.QUEUE_WAIT: "jobs wait for a free replica: add replicas (`blockpress replicas --replicas N`)",
    SpanName.ENGINE_PREFILL: "prompts are re-encoded: reuse sessions (session_id) to extend a warm KV cache",
    SpanName.ENGINE_CANVAS: "denoising dominates: compare steps per canvas with the step limit; a lower "
    "max_denoising_steps or a higher entropy_bound converges in fewer steps",
    SpanName.AGENT_TOOL: "tools are slow: speed up or cache the slowest tool, or give it a timeout",
    SpanName.AGENT_TURN: "agent turns outside the engine: check tool-call parsing and prompt building",
    SpanName.REPLICA_RUN: "replica time outside the engine: check event writes to Redis and tokenization",
}


@dataclass(frozen=True, slots=True)
class Percentiles:
    n: int
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        ordered = sorted(values)
        return cls(len(ordered), *(_percentile(ordered, q) for q in (0.50, 0.95, 0.99)))


@dataclass(frozen=True, slots=True)
class Summary:
    """What `trace stats` prints; JSON-able so labelled runs can be kept and compared later."""

    traces: int
    figures: dict[str, Percentiles] = field(default_factory=dict)
    stage_share: dict[str, float] = field(default_factory=dict)
    """Self time of each span name over the summed duration of all traces, largest first."""

    @property
    def dominant(self) -> str | None:
        return next(iter(self.stage_share), None)

    @property
    def advice(self) -> str:
        dominant = self.dominant or ""
        return ADVICE.get(dominant, "the gateway call itself dominates" if dominant.startswith("gateway.") else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        figures = {k: Percentiles(**v) for k, v in d.get("figures", {}).items()}
        return cls(traces=int(d["traces"]), figures=figures, stage_share=dict(d.get("stage_share", {})))


def _percentile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), exact on small samples.
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(spans: Iterable[SpanRecord]) -> float:
    return sum(s.duration_s for s in spans) * 1e3


def summarize(traces: Iterable[Sequence[SpanRecord]]) -> Summary:
    """Percentiles and stage shares over the given traces (each one job's spans); empty ones are skipped."""
    values: dict[str, list[float]] = defaultdict(list)
    self_ns: dict[str, int] = defaultdict(int)
    total_ns = count = 0
    for spans in traces:
        if not spans:
            continue
        count += 1
        start, end = min(s.start_ns for s in spans), max(s.end_ns for s in spans)
        total_ns += end - start
        by_name: dict[str, list[SpanRecord]] = defaultdict(list)
        for s in spans:
            by_name[s.name].append(s)
        if by_name[SpanName.QUEUE_WAIT]:
            values["queue_wait"].append(_ms(by_name[SpanName.QUEUE_WAIT]))
        if by_name[SpanName.ENGINE_PREFILL]:
            values["prefill"].append(_ms(by_name[SpanName.ENGINE_PREFILL]))
        values["tool_time"] += [s.duration_s * 1e3 for s in by_name[SpanName.AGENT_TOOL]]
        values["end_to_end"].append((end - start) / 1e6)
        views = canvases(spans)
        values["steps_per_canvas"] += [float(c.steps) for c in views]
        values["ms_per_step"] += [ms for c in views for ms in c.step_ms]
        canvas_spans = by_name[SpanName.ENGINE_CANVAS]
        if canvas_spans:
            first_end = min(s.end_ns for s in canvas_spans)
            values["time_to_first_canvas"].append((first_end - start) / 1e6)
            engine = canvas_spans + by_name[SpanName.ENGINE_PREFILL]
            engine_s = (max(s.end_ns for s in engine) - min(s.start_ns for s in engine)) / 1e9
            if engine_s > 0:
                values["tokens_per_s"].append(sum(c.tokens for c in views) / engine_s)
        for name, (_, ns) in stage_times(spans).items():
            self_ns[name] += ns
    figures = {k: p for k in FIGURES if (p := Percentiles.of(values[k])) is not None}
    shares = {n: ns / total_ns for n, ns in sorted(self_ns.items(), key=lambda kv: -kv[1]) if total_ns}
    return Summary(traces=count, figures=figures, stage_share=shares)


def render_summary(summary: Summary, *, label: str | None = None) -> str:
    """A table of p50/p95/p99 per figure, then the dominant stage and the advice for it."""
    head = f"{summary.traces} traces" + (f" ({label})" if label else "")
    lines = [head, f"{'figure':<22} {'unit':<6} {'p50':>9} {'p95':>9} {'p99':>9} {'n':>6}"]
    for name, unit in FIGURES.items():
        p = summary.figures.get(name)
        if p is not None:
            lines.append(f"{name:<22} {unit:<6} {p.p50:9.1f} {p.p95:9.1f} {p.p99:9.1f} {p.n:6d}")
        else:
            lines.append(f"{name:<22} {unit:<6} {'-':>9} {'-':>9} {'-':>9} {0:6d}")
    if summary.dominant is not None:
        share = summary.stage_share[summary.dominant]
        lines += ["", f"dominant stage: {summary.dominant} ({share:.0%} of job time)"]
        if summary.advice:
            lines.append(f"what usually helps: {summary.advice}")
    return "\n".join(lines)


def render_comparison(a: Summary, b: Summary, labels: tuple[str, str]) -> str:
    """Two runs side by side (p50 and p95 each) with the change in p50."""
    la, lb = (label[:17] for label in labels)
    lines = [
        f"{'figure':<22} {la + ' p50':>21} {la + ' p95':>21} {lb + ' p50':>21} {lb + ' p95':>21} {'Δp50':>8}",
    ]
    for name in FIGURES:
        pa, pb = a.figures.get(name), b.figures.get(name)
        if pa is None and pb is None:
            continue
        cells = [f"{v:21.1f}" if v is not None else f"{'-':>21}" for v in _pair(pa) + _pair(pb)]
        change = f"{(pb.p50 - pa.p50) / pa.p50:+8.0%}" if pa and pb and pa.p50 else f"{'':>8}"
        lines.append(f"{name:<22} {' '.join(cells)} {change}")
    lines.append("")
    lines.append(f"traces: {labels[0]} {a.traces}, {labels[1]} {b.traces}")
    lines.append(f"dominant stage: {labels[0]} {a.dominant or '-'}, {labels[1]} {b.dominant or '-'}")
    return "\n".join(lines)


def _pair(p: Percentiles | None) -> list[float | None]:
    return [None, None] if p is None else [p.p50, p.p95]
