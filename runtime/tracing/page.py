"""One job's trace as a self-contained HTML page: waterfall on a time axis, span details, canvas charts.

Nothing is fetched: inline CSS, SVG and a few lines of script. The waterfall has a labelled time axis
(ms from the trace's start) with grid lines; clicking a span's row shows all its attributes in the
detail panel, which starts on the largest stage's first span so the page says something before any
click (and without script). Each canvas gets a chart of accepted positions (left axis) and mean
entropy (right axis, nats) per step, both axes scaled and labelled.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence

from blockpress.runtime.tracing.store import SpanRecord
from blockpress.runtime.tracing.view import CanvasView, canvases, label, largest_stage, span_tree

__all__ = ["render_html"]

_CSS = (
    "body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:18px}h2{font-size:16px}"
    "svg text{font:12px ui-monospace,monospace;fill:#222}.bar{fill:#4a7bd0}.err{fill:#d04a4a}"
    ".span{cursor:pointer}.span:hover rect.row,.span.sel rect.row{fill:#eef3fb}rect.row{fill:transparent}"
    ".grid{stroke:#ddd}.axis{stroke:#888}.tick{fill:#555}"
    ".layout{display:flex;gap:24px;align-items:flex-start}"
    "#detail{min-width:320px;max-width:420px;border:1px solid #ccc;border-radius:4px;padding:8px 12px}"
    "#detail table{border-collapse:collapse}#detail td{padding:2px 8px 2px 0;vertical-align:top;"
    "font:12px ui-monospace,monospace;word-break:break-all}#detail h3{font-size:14px;margin:4px 0 8px}"
    ".curves{display:flex;flex-wrap:wrap;gap:24px}.acc{stroke:#4a7bd0;fill:none;stroke-width:2}"
    ".ent{stroke:#e08a1e;fill:none;stroke-width:2;stroke-dasharray:4 3}figure{margin:0;width:380px}"
    "figcaption{font-size:13px;margin-bottom:4px}"
)
_SCRIPT = (
    "const spans=JSON.parse(document.getElementById('span-data').textContent);"
    "function show(id){const s=spans[id];if(!s)return;"
    "document.querySelectorAll('.span').forEach(g=>g.classList.toggle('sel',g.dataset.spanId===id));"
    "const esc=t=>String(t).replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));"
    "document.getElementById('detail').innerHTML='<h3>'+esc(s.label)+'</h3><table>'+"
    "s.rows.map(r=>'<tr><td>'+esc(r[0])+'</td><td>'+esc(r[1])+'</td></tr>').join('')+'</table>';}"
    "document.querySelectorAll('.span').forEach(g=>g.addEventListener('click',()=>show(g.dataset.spanId)));"
)


def _nice_step(total: float, ticks: int = 6) -> float:
    raw = total / ticks
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next((m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw), 10 * power)


def _rows(s: SpanRecord, origin: int) -> list[tuple[str, str]]:
    """What the detail panel lists for a span: timing first, then every attribute."""
    rows = [
        ("duration", f"{s.duration_s * 1e3:.3f} ms"),
        ("start", f"{(s.start_ns - origin) / 1e6:.3f} ms"),
        ("status", s.status + (f": {s.status_message}" if s.status_message else "")),
        ("service", s.service),
        ("span id", s.span_id),
    ]
    rows += [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(s.attributes.items())]
    steps = [e for e in s.events if e.name == "step"]
    if steps:
        rows.append(("step events", str(len(steps))))
    return rows


def _detail(s: SpanRecord, origin: int) -> str:
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _rows(s, origin))
    return f"<h3>{html.escape(label(s))}</h3><table>{cells}</table>"


def _waterfall_svg(spans: Sequence[SpanRecord], start: int, total: int) -> str:
    rows = span_tree(spans)
    label_w, bar_w, row_h, top = 260, 520, 22, 34
    height = top + row_h * len(rows) + 8
    parts = [f'<svg id="waterfall" width="{label_w + bar_w + 140}" height="{height}" role="img">']
    step = _nice_step(total / 1e6)
    tick = 0.0
    while tick <= total / 1e6 + 1e-9:
        x = label_w + tick * 1e6 / total * bar_w
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 4}"/>'
            f'<text class="tick" x="{x:.1f}" y="{top - 8}" text-anchor="middle">{tick:g}</text>'
        )
        tick += step
    parts.append(
        f'<line class="axis" x1="{label_w}" y1="{top - 4}" x2="{label_w + bar_w}" y2="{top - 4}"/>'
        f'<text class="axis-label" x="{label_w + bar_w + 8}" y="{top - 8}">ms</text>'
        f'<text x="4" y="{top - 8}">span (click for details)</text>'
    )
    for i, (depth, s) in enumerate(rows):
        y = top + i * row_h
        x = label_w + (s.start_ns - start) / total * bar_w
        w = max(1.0, (s.end_ns - s.start_ns) / total * bar_w)
        cls = "err" if s.status == "ERROR" else "bar"
        parts.append(
            f'<g class="span" data-span-id="{s.span_id}">'
            f'<rect class="row" x="0" y="{y}" width="{label_w + bar_w + 140}" height="{row_h}"/>'
            f'<text x="{4 + 14 * depth}" y="{y + 15}">{html.escape(label(s))}</text>'
            f'<rect class="{cls}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" rx="2"/>'
            f'<text x="{label_w + bar_w + 8}" y="{y + 15}">{s.duration_s * 1e3:.1f} ms '
            f"{(s.end_ns - s.start_ns) / total:.0%}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _polyline(values: Sequence[float], cls: str, top: float, x0: int, w: int, h: int, y0: int) -> str:
    if not values:
        return ""
    dx = w / max(1, len(values) - 1)
    points = " ".join(f"{x0 + i * dx:.1f},{y0 + h - v / top * h:.1f}" for i, v in enumerate(values))
    return f'<polyline class="{cls}" points="{points}"/>'


def _curve_svg(c: CanvasView) -> str:
    x0, y0, w, h = 44, 10, 260, 120
    limit = f"/{c.max_steps}" if c.max_steps else ""
    caption = f"canvas #{c.index}: {c.steps}{limit} steps, {c.ms_per_step:.2f} ms/step, {c.tokens} tokens"
    acc_top = float(max(c.accepted, default=0) or 1)
    ent_top = max(c.mean_entropy, default=0.0) or 1.0
    n = max(len(c.accepted), len(c.mean_entropy), 1)
    parts = [
        f'<figure data-canvas="{c.index}"><figcaption>{html.escape(caption)}</figcaption>',
        f'<svg class="chart" width="{x0 + w + 76}" height="{y0 + h + 44}" role="img">',
        f'<line class="axis" x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}"/>',
        f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}"/>',
        f'<line class="axis" x1="{x0 + w}" y1="{y0}" x2="{x0 + w}" y2="{y0 + h}"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = y0 + h - frac * h
        parts.append(
            f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}"/>'
            f'<text class="tick y-acc" x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{acc_top * frac:g}</text>'
            f'<text class="tick y-ent" x="{x0 + w + 4}" y="{y + 4:.1f}">{ent_top * frac:.2g}</text>'
        )
    for i in sorted({0, n - 1}):
        x = x0 + (i / max(1, n - 1)) * w
        parts.append(f'<text class="tick x-step" x="{x:.1f}" y="{y0 + h + 14}" text-anchor="middle">{i + 1}</text>')
    parts += [
        _polyline(c.accepted, "acc", acc_top, x0, w, h, y0),
        _polyline(c.mean_entropy, "ent", ent_top, x0, w, h, y0),
        f'<text class="axis-label x-label" x="{x0 + w / 2}" y="{y0 + h + 30}" text-anchor="middle">step</text>',
        f'<text class="axis-label y-label" transform="translate(12,{y0 + h / 2}) rotate(-90)" '
        'text-anchor="middle">accepted (solid)</text>',
        f'<text class="axis-label y2-label" transform="translate({x0 + w + 60},{y0 + h / 2}) rotate(90)" '
        'text-anchor="middle">entropy (dashed)</text>',
        "</svg></figure>",
    ]
    return "".join(parts)


def render_html(spans: Sequence[SpanRecord]) -> str:
    """One self-contained page: waterfall on a time axis, a detail panel, each canvas's convergence chart."""
    if not spans:
        return "<!doctype html><title>no spans</title><p>no spans</p>"
    start = min(s.start_ns for s in spans)
    total = max(max(s.end_ns for s in spans) - start, 1)
    stage = largest_stage(spans)
    job = next((str(s.attributes["blockpress.job.id"]) for s in spans if "blockpress.job.id" in s.attributes), "")
    title = f"trace {spans[0].trace_id}" + (f", job {job}" if job else "")
    summary = f"{total / 1e6:.1f} ms, {len(spans)} spans"
    if stage is not None:
        summary += f"; largest stage: {stage.name}, {stage.seconds * 1e3:.1f} ms ({stage.share:.0%})"
    selected = next((s for s in spans if stage is not None and s.name == stage.name), spans[0])
    data = {s.span_id: {"label": label(s), "rows": _rows(s, start)} for s in spans}
    # Span names and attributes are data: as JSON escapes, `<`, `>` and `&` can neither end the script
    # element nor be read as markup.
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    curves = "".join(_curve_svg(c) for c in canvases(spans))
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>"
        f'<h2>Waterfall</h2><div class="layout">{_waterfall_svg(spans, start, total)}'
        f'<aside id="detail" aria-live="polite">{_detail(selected, start)}</aside></div>'
        + (f'<h2>Canvas convergence</h2><div class="curves">{curves}</div>' if curves else "")
        + f'<script type="application/json" id="span-data">{payload}</script><script>{_SCRIPT}</script>'
        + "</body></html>\n"
    )
