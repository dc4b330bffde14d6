"""Two sets of traces compared stage by stage: what got faster or slower, by how much, and why.

A side is one job's trace or many (recent jobs through a filter, a labelled run). Each side becomes a
`Profile`: per stage (span name) the mean self time per job, which add up to the mean job time, so a
stage's share is its part of the job; `engine.canvas` is split further into the decoder forward, the
sampler and the time outside the steps (the consumer's, between steps), from the step events. The
profile also keeps the few facts the hints need: turns, prompt and prefilled tokens, canvases that ran
to the step limit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.store import SpanRecord
from blockpress.runtime.tracing.view import canvases, stage_times

__all__ = ["Profile", "hints", "profile", "render_diff"]

DECODER = f"{SpanName.ENGINE_CANVAS}/decoder"
SAMPLER = f"{SpanName.ENGINE_CANVAS}/sampler"
OUTSIDE = f"{SpanName.ENGINE_CANVAS}/between steps"
_PARTS = (DECODER, SAMPLER, OUTSIDE)
# A change smaller than both of these is noise on a shared machine, not a finding.
_SAME_MS = 0.5
_SAME_REL = 0.05


@dataclass(frozen=True, slots=True)
class Profile:
    """Where the time of a set of jobs went, per job on average; JSON-able for labelled runs."""

    jobs: int
    job_ms: float
    """Mean duration of a job's trace."""
    stage_ms: dict[str, float] = field(default_factory=dict)
    """Mean self time per job of each span name, and of the `engine.canvas/...` parts."""
    turns: float = 0.0
    """Mean prefills per job (agent turns; 1 for a generation)."""
    prompt_tokens: float = 0.0
    """Mean prompt tokens per prefill."""
    prefilled_tokens: float = 0.0
    """Mean tokens the encoder actually ran per prefill (less than the prompt on a warm session)."""
    canvases: int = 0
    at_step_limit: int = 0
    """Canvases whose steps reached their step limit: they stopped without converging."""
    max_steps: int = 0
    steps_per_canvas: float = 0.0
    ms_per_step: float = 0.0

    def share(self, stage: str) -> float:
        return self.stage_ms.get(stage, 0.0) / self.job_ms if self.job_ms else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(**{**d, "stage_ms": dict(d.get("stage_ms", {}))})


def profile(traces: Iterable[Sequence[SpanRecord]]) -> Profile:
    """The mean per-job profile of `traces` (each one job's spans); empty traces are skipped."""
    stage_ns: dict[str, float] = defaultdict(float)
    jobs = total_ns = prefills = prompt = prefilled = 0
    views = []
    for spans in traces:
        if not spans:
            continue
        jobs += 1
        total_ns += max(s.end_ns for s in spans) - min(s.start_ns for s in spans)
        for name, (_, ns) in stage_times(spans).items():
            stage_ns[name] += ns
        for s in spans:
            if s.name == SpanName.ENGINE_PREFILL:
                prefills += 1
                prompt += int(s.attributes.get(Attr.GEN_AI_INPUT_TOKENS, 0))
                prefilled += int(s.attributes.get(Attr.PREFILL_TOKENS, 0))
        for c in canvases(spans):
            views.append(c)
            decoder = sum(c.decoder_ms)
            stage_ns[DECODER] += decoder * 1e6
            stage_ns[SAMPLER] += (sum(c.step_ms) - decoder) * 1e6 if c.decoder_ms else 0.0
            stage_ns[OUTSIDE] += max(0.0, c.duration_ms - sum(c.step_ms)) * 1e6 if c.step_ms else 0.0
    if not jobs:
        return Profile(jobs=0, job_ms=0.0)
    steps = [ms for c in views for ms in c.step_ms]
    return Profile(
        jobs=jobs,
        job_ms=total_ns / jobs / 1e6,
        stage_ms={n: ns / jobs / 1e6 for n, ns in sorted(stage_ns.items(), key=lambda kv: -kv[1]) if ns > 0},
        turns=prefills / jobs,
        prompt_tokens=prompt / prefills if prefills else 0.0,
        prefilled_tokens=prefilled / prefills if prefills else 0.0,
        canvases=len(views),
        at_step_limit=sum(1 for c in views if c.max_steps and c.steps >= c.max_steps),
        max_steps=max((c.max_steps for c in views), default=0),
        steps_per_canvas=sum(c.steps for c in views) / len(views) if views else 0.0,
        ms_per_step=sum(steps) / len(steps) if steps else 0.0,
    )


def hints(p: Profile) -> list[str]:
    """What the data of one side supports saying, most important first; nothing where it says nothing."""
    out: list[str] = []
    prefill = p.share(SpanName.ENGINE_PREFILL)
    if prefill >= 0.25 and p.turns >= 2 and p.prefilled_tokens >= 0.8 * p.prompt_tokens > 0:
        out.append(
            f"prefill is {prefill:.0%} of the job over {p.turns:.1f} turns, and each turn re-encodes its whole "
            f"prompt ({p.prefilled_tokens:.0f} of {p.prompt_tokens:.0f} tokens): run the conversation in a "
            "session (session_id) so a turn encodes only what is new"
        )
    elif prefill >= 0.4:
        out.append(f"prefill is {prefill:.0%} of the job: the prompt ({p.prompt_tokens:.0f} tokens) dominates")
    if p.canvases and p.at_step_limit / p.canvases >= 0.5:
        out.append(
            f"{p.at_step_limit} of {p.canvases} canvases ran to the step limit ({p.max_steps} steps), so they "
            "stopped unconverged: check the output's quality at this limit; a higher entropy_bound accepts "
            "more positions per step and converges in fewer"
        )
    if p.share(SpanName.QUEUE_WAIT) >= 0.3:
        out.append(
            f"jobs waited {p.share(SpanName.QUEUE_WAIT):.0%} of their time for a replica: add replicas "
            "(`blockpress replicas --replicas N`) or send fewer jobs at once"
        )
    if p.share(SpanName.AGENT_TOOL) >= 0.3:
        out.append(f"tools take {p.share(SpanName.AGENT_TOOL):.0%} of the job: speed up or cache the slowest")
    return out


def _verdict(a: float, b: float) -> str:
    change = b - a
    if abs(change) < max(_SAME_MS, _SAME_REL * max(a, b)):
        return "same"
    return "slower" if change > 0 else "faster"


def _rel(a: float, b: float) -> str:
    return f"{(b - a) / a:+6.0%}" if a else "   new"


def render_diff(a: Profile, b: Profile, labels: tuple[str, str]) -> str:
    """The two sides stage by stage (mean ms per job, share of the job), the change and the hints."""
    la, lb = (label[:40] for label in labels)
    stages = list(dict.fromkeys([*a.stage_ms, *b.stage_ms]))
    # The canvas's parts go right under it; the rest by the larger of the two sides.
    top = sorted((s for s in stages if s not in _PARTS), key=lambda s: -max(a.stage_ms.get(s, 0), b.stage_ms.get(s, 0)))
    rows: list[str] = []
    for s in top:
        rows.append(s)
        if s == SpanName.ENGINE_CANVAS:
            rows += [part for part in _PARTS if part in stages]
    width = max([len("stage"), *(len(_row_label(r)) for r in rows)])
    lines = [
        f"A: {la} ({a.jobs} job{'s' * (a.jobs != 1)}, {a.job_ms:.1f} ms)",
        f"B: {lb} ({b.jobs} job{'s' * (b.jobs != 1)}, {b.job_ms:.1f} ms)",
        "",
        f"{'stage':<{width}}  {'A ms':>9} {'share':>5}  {'B ms':>9} {'share':>5}  {'change':>9} {'':>6}",
    ]
    for r in rows:
        ma, mb = a.stage_ms.get(r, 0.0), b.stage_ms.get(r, 0.0)
        lines.append(
            f"{_row_label(r):<{width}}  {ma:9.1f} {a.share(r):5.0%}  {mb:9.1f} {b.share(r):5.0%}"
            f"  {mb - ma:+9.1f} {_rel(ma, mb)}  {_verdict(ma, mb)}"
        )
    lines.append(
        f"{'job':<{width}}  {a.job_ms:9.1f} {'':>5}  {b.job_ms:9.1f} {'':>5}"
        f"  {b.job_ms - a.job_ms:+9.1f} {_rel(a.job_ms, b.job_ms)}  {_verdict(a.job_ms, b.job_ms)}"
    )
    lines += ["", f"{'figure':<20} {'A':>10} {'B':>10}"]
    for name, fa, fb in (
        ("ms per step", f"{a.ms_per_step:.2f}", f"{b.ms_per_step:.2f}"),
        ("steps per canvas", f"{a.steps_per_canvas:.1f}", f"{b.steps_per_canvas:.1f}"),
        ("at step limit", f"{a.at_step_limit}/{a.canvases}", f"{b.at_step_limit}/{b.canvases}"),
        ("turns per job", f"{a.turns:.1f}", f"{b.turns:.1f}"),
        ("prompt tokens", f"{a.prompt_tokens:.0f}", f"{b.prompt_tokens:.0f}"),
        ("prefilled tokens", f"{a.prefilled_tokens:.0f}", f"{b.prefilled_tokens:.0f}"),
    ):
        lines.append(f"{name:<20} {fa:>10} {fb:>10}")
    moved = [r for r in top if r != SpanName.ENGINE_CANVAS or not any(p in stages for p in _PARTS)]
    moved += [p for p in _PARTS if p in stages]
    if moved:
        biggest = max(moved, key=lambda r: abs(b.stage_ms.get(r, 0.0) - a.stage_ms.get(r, 0.0)))
        change = b.stage_ms.get(biggest, 0.0) - a.stage_ms.get(biggest, 0.0)
        if _verdict(a.stage_ms.get(biggest, 0.0), b.stage_ms.get(biggest, 0.0)) != "same":
            lines += ["", f"largest change: {biggest} {change:+.1f} ms per job ({_verdict(0, change)} in B)"]
    for label, p in (("A", a), ("B", b)):
        for h in hints(p):
            lines.append(f"hint ({label}): {h}")
    return "\n".join(lines)


def _row_label(stage: str) -> str:
    return "  " + stage.split("/", 1)[1] if stage in _PARTS else stage
