"""`TracedEngine`: an `Engine` whose generations record `engine.prefill`, `engine.commit` and `engine.canvas` spans.

The replica wraps its engine in one, so the engine's part of a job's trace comes from a wrapper
rather than from code inside the denoising loop; the runner and the agent model see an `Engine` either
way. The span names and attributes are the runtime's shared vocabulary (`runtime.tracing.names`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.telemetry import canvas_counter, get_tracer
from blockpress.workers.protocol import CancelSignal, Engine, Prompt, Session
from blockpress.workers.types import (
    CanvasEvent,
    DraftEvent,
    EndEvent,
    GenerationResult,
    StreamEvent,
    result_of,
)

__all__ = ["TracedEngine", "trace_stream"]


class TracedEngine:
    """`engine` with spans around `stream` and `generate`; every other member is the engine's own.

    Args:
        engine: the engine to wrap.
        tracer: where the spans go; default the global BlockPress tracer, looked up per generation
            so that a `setup_tracing` after construction still counts.
    """

    def __init__(self, engine: Engine, *, tracer: trace.Tracer | None = None) -> None:
        self._engine = engine
        self._tracer = tracer

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    @property
    def model(self) -> Any:
        """The wrapped engine's model, if it has one: image prompts read its config (`workers/images.py`)."""
        return getattr(self._engine, "model", None)

    def encode(self, text: str) -> list[int]:
        return self._engine.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._engine.decode(token_ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self._engine.apply_chat_template(messages, tools=tools)

    def resolve(self, settings: DenoiseSettings | None = None) -> DenoiseSettings:
        return self._engine.resolve(settings)

    def new_session(self) -> Session:
        return self._engine.new_session()

    def stream(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: Any = None,
        template: Sequence[int | None] | None = None,
    ) -> Iterator[StreamEvent]:
        events = self._engine.stream(prompt, settings, cancel=cancel, session=session, template=template)
        return trace_stream(events, tracer=self._tracer)

    def generate(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: Any = None,
        template: Sequence[int | None] | None = None,
    ) -> GenerationResult:
        return result_of(self.stream(prompt, settings, cancel=cancel, session=session, template=template))


def trace_stream(events: Iterable[StreamEvent], *, tracer: trace.Tracer | None = None) -> Iterator[StreamEvent]:
    """Pass an engine stream through, recording `engine.prefill`, `engine.commit` and `engine.canvas` spans.

    Spans are parented on the context current when iteration starts (the replica's `replica.run`, or
    an agent turn). A denoising step costs one clock read and one list append here; the spans and their
    step events are built once per canvas, when the canvas is committed, so tracing stays off the step
    loop. Times come from the engine's own measurements (`DraftEvent.step_s`, `decoder_s`, `commit_s`,
    `prefill`), placed on the wall clock at the moment each step is reported.
    """
    tracer = tracer or get_tracer()
    recorder = _StreamRecorder(tracer, otel_context.get_current(), time.time_ns())
    steps = recorder.steps
    try:
        for event in events:
            now = time.time_ns()
            if type(event) is DraftEvent:
                steps.append((now, event))
            elif isinstance(event, CanvasEvent):
                recorder.canvas(now, event)
            elif isinstance(event, EndEvent):
                recorder.end(event.result)
            yield event
    except Exception as exc:  # not GeneratorExit: a consumer that stops early is no failure
        recorder.fail(exc)
        raise
    finally:
        recorder.close()
        # A consumer that stops early (a complete tool call) must stop the engine now, not whenever
        # the wrapped generator happens to be collected.
        close = getattr(events, "close", None)
        if close is not None:
            close()


class _StreamRecorder:
    """Turns the events of one engine stream into spans; see `trace_stream`."""

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, start_ns: int) -> None:
        self.tracer = tracer
        self.parent = parent
        self.start_ns = start_ns
        # Spans are made once their times are known (the prefill's from the engine's own timing), so
        # each starts where what it names began, not where the stream was first read.
        self.prefill_open = True
        self.prefill_end_ns: int | None = None
        self.steps: list[tuple[int, DraftEvent]] = []
        self.last_end_ns: int | None = None
        """Where the previous canvas ended: the start of a canvas that streamed no drafts."""
        self.job_index = canvas_counter(parent)

    def _first_step(self) -> int | None:
        """Start of the canvas's first step: it was reported `step_s` after it began."""
        if not self.steps:
            return None
        at, first = self.steps[0]
        # Never before what preceded it on this thread: reported times are exact, the clamp only
        # absorbs clock granularity.
        floor = self.last_end_ns or self.start_ns
        begin = max(floor, at - int(first.step_s * 1e9))
        if first.commit_s:
            committed = (first.canvas_index if self.job_index is None else self.job_index.peek()) - 1
            commit_start = max(floor, begin - int(first.commit_s * 1e9))
            self._span(SpanName.ENGINE_COMMIT, commit_start, begin, {Attr.CANVAS_INDEX: committed})
            begin = max(begin, commit_start)
        if first.prefill is not None and self.prefill_open:
            p = first.prefill
            self._prefill(begin - int(p.seconds * 1e9), begin, p.prompt_tokens, p.prefilled_tokens)
        return begin

    def _span(self, name: str, start: int, end: int | None, attributes: dict[str, Any]) -> trace.Span:
        span = self.tracer.start_span(name, context=self.parent, start_time=start, attributes=attributes)
        if end is not None:
            span.end(end_time=end)
        return span

    def _prefill(self, start: int, end: int | None, prompt: int | None, prefilled: int | None) -> trace.Span:
        attributes = {} if prompt is None else {Attr.GEN_AI_INPUT_TOKENS: prompt, Attr.PREFILL_TOKENS: prefilled}
        self.prefill_open = False
        self.prefill_end_ns = end
        return self._span(SpanName.ENGINE_PREFILL, max(self.start_ns, start), end, attributes)

    def _canvas_span(self, start: int, attributes: dict[str, Any]) -> trace.Span:
        span = self.tracer.start_span(
            SpanName.ENGINE_CANVAS, context=self.parent, start_time=start, attributes=attributes
        )
        for at, d in self.steps:
            span.add_event(SpanName.STEP_EVENT, _step(d), timestamp=at)
        self.steps.clear()
        return span

    def _next_index(self, engine_index: int) -> int:
        return engine_index if self.job_index is None else self.job_index.next()

    def canvas(self, now: int, event: CanvasEvent) -> None:
        stats = event.stats
        had_drafts = bool(self.steps)
        start = self._first_step()
        if start is None:
            start = max(self.prefill_end_ns or self.start_ns, self.last_end_ns or 0, now - int(sum(stats.step_s) * 1e9))
        attributes: dict[str, Any] = {
            Attr.CANVAS_INDEX: self._next_index(stats.index),
            Attr.CANVAS_GENERATION_INDEX: stats.index,
            Attr.CANVAS_STEPS: stats.steps,
            Attr.CANVAS_MAX_STEPS: stats.max_steps,
            Attr.CANVAS_TOKENS: stats.tokens_committed,
            Attr.CANVAS_MEAN_ENTROPY: stats.mean_entropy,
            Attr.CANVAS_DENOISE_MS: sum(stats.step_s) * 1e3,
        }
        span = self._canvas_span(start, attributes)
        if not had_drafts:
            # No drafts were streamed: the canvas's own statistics still give every step but its entropy.
            at = start
            # Steps count from 1, as the engine's `DraftEvent.step` does.
            for i, (step_s, accepted) in enumerate(zip(stats.step_s, stats.accepted_per_step, strict=False), 1):
                at += int(step_s * 1e9)
                span.add_event(SpanName.STEP_EVENT, _step(DraftEvent(stats.index, i, [], accepted, -1.0, step_s)),
                               timestamp=at)  # fmt: skip
        span.end(end_time=now)
        self.last_end_ns = now

    def end(self, result: GenerationResult) -> None:
        if not self.prefill_open:
            return
        # An engine that reports no prefill with its first step: the result's timings say how long it took.
        end = self.start_ns + int(result.timings.prefill_s * 1e9)
        self._prefill(self.start_ns, end, result.prompt_tokens, result.prefilled_tokens)

    def fail(self, exc: Exception) -> None:
        """Mark the stage the engine was in when it raised (cancelled, broken) as failed."""
        if self.steps:
            index, taken = self.steps[0][1].canvas_index, len(self.steps)
            begin = self._first_step() or self.start_ns
            span = self._canvas_span(begin, {Attr.CANVAS_INDEX: self._next_index(index), Attr.CANVAS_STEPS: taken})
        elif self.prefill_open and self.last_end_ns is None:
            span = self._prefill(self.start_ns, None, None, None)
        else:
            return
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        span.end()

    def close(self) -> None:
        if self.steps:
            self._first_step()  # a stream stopped mid-canvas still reports its prefill and commit
        if self.prefill_open:
            # Neither a first step nor a result said when the prefill ended: up to the first canvas.
            self._prefill(self.start_ns, self.last_end_ns or time.time_ns(), None, None)


def _step(d: DraftEvent) -> dict[str, Any]:
    attributes: dict[str, Any] = {Attr.STEP: d.step, Attr.STEP_MS: d.step_s * 1e3, Attr.ACCEPTED: d.accepted}
    if d.mean_entropy >= 0:
        attributes[Attr.MEAN_ENTROPY] = d.mean_entropy
    if d.decoder_s is not None:
        attributes[Attr.DECODER_MS] = d.decoder_s * 1e3
        attributes[Attr.SAMPLER_MS] = max(0.0, d.step_s - d.decoder_s) * 1e3
    return attributes
