"""`TracedEngine`: an `Engine` whose generations record `engine.prefill` and `engine.canvas` spans.

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
from blockpress.runtime.tracing.telemetry import get_tracer
from blockpress.workers.protocol import CancelSignal, Engine, Prompt, Session
from blockpress.workers.types import CanvasEvent, DraftEvent, EndEvent, GenerationResult, StreamEvent, result_of

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
    """Pass an engine stream through, recording `engine.prefill` and one `engine.canvas` per canvas.

    Spans are parented on the context current when iteration starts (the replica's `replica.run`).
    A denoising step costs one clock read and one list append here; the span and its step events are
    built once per canvas, when the canvas is committed, so tracing stays off the step loop.
    """
    tracer = tracer or get_tracer()
    recorder = _StreamRecorder(tracer, otel_context.get_current(), time.time_ns())
    if not recorder.prefill.is_recording():
        yield from events
        return
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
        self.prefill = tracer.start_span(SpanName.ENGINE_PREFILL, context=parent, start_time=start_ns)
        self.prefill_open = True
        self.steps: list[tuple[int, DraftEvent]] = []
        self.canvas_start_ns: int | None = None

    def _canvas_start(self, now: int, step_s: float) -> int:
        # The engine reports nothing when prefill ends; it ended one step before the first step was
        # reported, which is exact enough for a waterfall and costs nothing.
        if self.steps:
            now, step_s = self.steps[0][0], self.steps[0][1].step_s
        if self.canvas_start_ns is None:
            self.canvas_start_ns = max(self.start_ns, now - int(step_s * 1e9))
        return self.canvas_start_ns

    def _canvas_span(self, start: int, attributes: dict[str, Any]) -> trace.Span:
        span = self.tracer.start_span(
            SpanName.ENGINE_CANVAS, context=self.parent, start_time=start, attributes=attributes
        )
        for at, d in self.steps:
            span.add_event(SpanName.STEP_EVENT, _step(d.step, d.step_s, d.accepted, d.mean_entropy), timestamp=at)
        self.steps.clear()
        return span

    def canvas(self, now: int, event: CanvasEvent) -> None:
        stats = event.stats
        start = self._canvas_start(now, sum(stats.step_s))
        had_drafts = bool(self.steps)
        span = self._canvas_span(
            start,
            {
                Attr.CANVAS_INDEX: stats.index,
                Attr.CANVAS_STEPS: stats.steps,
                Attr.CANVAS_MAX_STEPS: stats.max_steps,
                Attr.CANVAS_TOKENS: stats.tokens_committed,
                Attr.CANVAS_MEAN_ENTROPY: stats.mean_entropy,
            },
        )
        if not had_drafts:
            # No drafts were streamed: the canvas's own statistics still give every step but its entropy.
            at = start
            # Steps count from 1, as the engine's `DraftEvent.step` does.
            for i, (step_s, accepted) in enumerate(zip(stats.step_s, stats.accepted_per_step, strict=False), 1):
                at += int(step_s * 1e9)
                span.add_event(SpanName.STEP_EVENT, _step(i, step_s, accepted, None), timestamp=at)
        span.end(end_time=now)
        self.canvas_start_ns = now

    def end(self, result: GenerationResult) -> None:
        self.prefill.set_attribute(Attr.GEN_AI_INPUT_TOKENS, result.prompt_tokens)
        self.prefill.set_attribute(Attr.PREFILL_TOKENS, result.prefilled_tokens)
        self.prefill.end(end_time=self.start_ns + int(result.timings.prefill_s * 1e9))
        self.prefill_open = False

    def fail(self, exc: Exception) -> None:
        """Mark the stage the engine was in when it raised (cancelled, broken) as failed."""
        if self.steps:
            index, taken = self.steps[0][1].canvas_index, len(self.steps)
            span = self._canvas_span(self._canvas_start(0, 0.0), {Attr.CANVAS_INDEX: index, Attr.CANVAS_STEPS: taken})
        elif self.canvas_start_ns is None:
            span = self.prefill
        else:
            return
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        if span is not self.prefill:
            span.end()

    def close(self) -> None:
        if self.prefill_open:
            self.prefill.end(end_time=self.canvas_start_ns)
            self.prefill_open = False


def _step(step: int, step_s: float, accepted: int, mean_entropy: float | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {Attr.STEP: step, Attr.STEP_MS: step_s * 1e3, Attr.ACCEPTED: accepted}
    if mean_entropy is not None:
        attributes[Attr.MEAN_ENTROPY] = mean_entropy
    return attributes
