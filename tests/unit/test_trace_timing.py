"""Spans measure what they name: each is checked against clocks the test takes itself.

The real engine on a random-weight checkpoint runs with its pieces wrapped in wall clocks (the
session's prefill and commits, the decoder's forward, the sampler step); the spans `TracedEngine`
records must agree with those clocks and with the engine's own `Timings`. The machine is shared and
loaded, so agreement is within a tolerance of two milliseconds and 10%, far below the errors
these tests exist for (a prefill span that ran to the end of the first canvas was off by a whole canvas).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from blockpress.agents.loop import AgentLoop
from blockpress.agents.task import AgentTask
from blockpress.agents.testing import ScriptedModel, call
from blockpress.agents.tools import ToolRegistry, tool
from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.queue.claim import Claim
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.telemetry import job_context, setup_tracing
from blockpress.workers import denoiser as denoiser_module
from blockpress.workers.instrument import replica_span
from blockpress.workers.traced import TracedEngine, trace_stream
from blockpress.workers.types import CanvasEvent, CanvasStats, DraftEvent, EndEvent, PrefillStats

MS = 1_000_000  # ns
# No stop token: every canvas runs, so the generation has commits between canvases.
SETTINGS = DenoiseSettings(max_new_tokens=96, max_denoising_steps=4, seed=3, stop_token_ids=())


def close(measured_ns: float, expected_ns: float, *, slack_ms: float = 2.0, rel: float = 0.1) -> bool:
    return abs(measured_ns - expected_ns) <= slack_ms * MS + rel * abs(expected_ns)


@pytest.fixture
def spans() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


class Clocks:
    """Wall-clock intervals (epoch ns) of the engine's pieces, taken around the calls themselves."""

    def __init__(self) -> None:
        self.prefill: list[tuple[int, int]] = []
        self.append: list[tuple[int, int]] = []
        self.head: list[tuple[int, int]] = []
        """Decoder passes of the denoising steps."""
        self.sampler: list[tuple[int, int]] = []

    def wrap(self, fn: Callable[..., Any], into: list[tuple[int, int]]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            begin = time.time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                into.append((begin, time.time_ns()))

        return timed

    def commits(self) -> list[tuple[int, int]]:
        """Appends outside a prefill (a prefill encodes its new tokens through `append` too)."""
        return [a for a in self.append if not any(p[0] <= a[0] <= p[1] for p in self.prefill)]


@pytest.fixture
def clocked(engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Clocks, Any]]:
    """The engine with its pieces timed from outside: the decoder pass runs from the decoder's token
    embedding to the sampler step's call (whose argument it is), the sampler step is wrapped whole."""
    clocks = Clocks()
    session = engine.new_session()
    monkeypatch.setattr(session, "prefill", clocks.wrap(session.prefill, clocks.prefill))
    monkeypatch.setattr(session, "append", clocks.wrap(session.append, clocks.append))
    decoder_began: list[int] = []
    sample = denoiser_module.sample_step

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        begin = time.time_ns()
        clocks.head.append((decoder_began.pop(), begin))
        try:
            return sample(*args, **kwargs)
        finally:
            clocks.sampler.append((begin, time.time_ns()))

    monkeypatch.setattr(denoiser_module, "sample_step", timed_sample)
    embed = engine.model.model.decoder.embed_tokens
    hook = embed.register_forward_pre_hook(lambda module, args: decoder_began.append(time.time_ns()))
    yield engine, clocks, session
    hook.remove()


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return sorted((s for s in exporter.get_finished_spans() if s.name == name), key=lambda s: s.start_time or 0)


def interval(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None and span.end_time is not None
    return span.start_time, span.end_time


def test_prefill_canvas_commit_and_step_parts_agree_with_independent_clocks(clocked, spans):
    engine, clocks, session = clocked
    tracer, exporter = spans
    result = TracedEngine(engine, tracer=tracer).generate("Where does the time go?", SETTINGS, session=session)
    assert len(result.canvases) == 3

    [prefill] = by_name(exporter, SpanName.ENGINE_PREFILL)
    [(wall_begin, wall_end)] = clocks.prefill
    begin, end = interval(prefill)
    assert close(end - begin, result.timings.prefill_s * 1e9, slack_ms=0.05, rel=0.0), "the engine's own figure"
    assert close(begin, wall_begin) and close(end, wall_end), "where the encoder actually ran"
    assert prefill.attributes[Attr.GEN_AI_INPUT_TOKENS] == result.prompt_tokens
    assert prefill.attributes[Attr.PREFILL_TOKENS] == result.prefilled_tokens > 0

    canvases = by_name(exporter, SpanName.ENGINE_CANVAS)
    assert [c.attributes[Attr.CANVAS_INDEX] for c in canvases] == [0, 1, 2]
    assert end <= interval(canvases[0])[0], "prefill ends before the first canvas starts"
    heads = iter(clocks.head)
    samplers = iter(clocks.sampler)
    for canvas, stats in zip(canvases, result.canvases, strict=True):
        c_begin, c_end = interval(canvas)
        steps = [dict(e.attributes or {}) for e in canvas.events if e.name == SpanName.STEP_EVENT]
        assert len(steps) == stats.steps
        walls = [(next(heads), next(samplers)) for _ in steps]
        first_head = walls[0][0]
        assert close(c_begin, first_head[0]), "a canvas starts at its first decoder forward"
        assert c_end >= walls[-1][1][1], "and ends after its last sampler step"
        assert sum(s[Attr.STEP_MS] for s in steps) == pytest.approx(sum(stats.step_s) * 1e3)
        for step, (head, sample) in zip(steps, walls, strict=True):
            assert close(step[Attr.DECODER_MS] * MS, head[1] - head[0], slack_ms=1.0, rel=0.15)
            assert step[Attr.SAMPLER_MS] * MS >= (sample[1] - sample[0]) - 1.0 * MS
            assert step[Attr.DECODER_MS] + step[Attr.SAMPLER_MS] == pytest.approx(step[Attr.STEP_MS])

    commits = by_name(exporter, SpanName.ENGINE_COMMIT)
    assert [c.attributes[Attr.CANVAS_INDEX] for c in commits] == [0, 1]
    walls = clocks.commits()
    assert len(walls) == 2
    for commit, (w_begin, w_end), before, after in zip(commits, walls, canvases, canvases[1:], strict=False):
        begin, end = interval(commit)
        assert close(begin, w_begin) and close(end, w_end)
        assert interval(before)[1] <= begin and end <= interval(after)[0], "between the two canvases"


def test_a_turn_stopped_at_its_first_canvas_reports_its_prefill_not_the_canvas(clocked, spans):
    """The turn-0 agent bug: a consumer that closes the stream at a complete tool call."""
    engine, clocks, session = clocked
    tracer, exporter = spans
    traced = TracedEngine(engine, tracer=tracer)
    token = otel_context.attach(job_context(otel_context.get_current()))
    try:
        for turn in range(2):
            stream = traced.stream(f"turn {turn}: call the calculator", SETTINGS, session=session)
            for event in stream:
                assert not isinstance(event, EndEvent)
                if isinstance(event, CanvasEvent):
                    break
            stream.close()
    finally:
        otel_context.detach(token)

    prefills = by_name(exporter, SpanName.ENGINE_PREFILL)
    canvases = by_name(exporter, SpanName.ENGINE_CANVAS)
    assert len(prefills) == len(canvases) == 2
    for prefill, canvas, (w_begin, w_end) in zip(prefills, canvases, clocks.prefill, strict=True):
        begin, end = interval(prefill)
        assert close(begin, w_begin) and close(end, w_end)
        assert end <= interval(canvas)[0]
        assert prefill.attributes[Attr.GEN_AI_INPUT_TOKENS] > 0
        assert Attr.PREFILL_TOKENS in prefill.attributes
    # One job's canvases are numbered across its turns, as the job's event stream numbers them.
    assert [c.attributes[Attr.CANVAS_INDEX] for c in canvases] == [0, 1]
    assert [c.attributes[Attr.CANVAS_GENERATION_INDEX] for c in canvases] == [0, 0]


def test_tool_and_turn_spans_cover_what_ran_inside_them():
    exporter = InMemorySpanExporter()
    setup_tracing("blockpress-test", processors=(SimpleSpanProcessor(exporter),))
    registry = ToolRegistry()
    registry.register(slow_lookup)  # isolated, as tools run by default: the clock is read in its process
    model = ScriptedModel([call("slow_lookup", key="abc"), "ABC"])
    AgentLoop(model, registry).run(AgentTask.from_instructions("look abc up", tools=("slow_lookup",)))

    finished = exporter.get_finished_spans()
    [tool_span] = [s for s in finished if s.name == SpanName.AGENT_TOOL]
    begin, end = interval(tool_span)
    t_begin, t_end = model.requests[1][-1]["content"]["result"]
    assert begin <= t_begin and t_end <= end
    assert t_end - t_begin >= 30 * MS
    assert tool_span.attributes[Attr.GEN_AI_TOOL_NAME] == "slow_lookup"
    assert tool_span.attributes[Attr.TOOL_OUTCOME] == "ok"
    turns = [s for s in finished if s.name == SpanName.AGENT_TURN]
    assert [t.attributes[Attr.TURN_INDEX] for t in turns] == [0, 1]
    assert interval(turns[0])[1] <= begin and end <= interval(turns[1])[0], "the tool runs between the turns"


@tool
def slow_lookup(key: str) -> list[int]:
    """Looks a key up, slowly; returns when it ran (epoch ns)."""
    begin = time.time_ns()
    time.sleep(0.03)
    return [begin, time.time_ns()]


def _fake_stream(index_in_generation: int) -> Iterator[Any]:
    stats = CanvasStats(index_in_generation, 1, 4, 3, 0.1, [3], [0.001])
    yield DraftEvent(index_in_generation, 1, [0], 3, 0.1, 0.001, 0.0005, 0.0, PrefillStats(5, 5, 0.0001))
    yield CanvasEvent(index_in_generation, [1, 2, 3], "abc", stats)


def test_the_replica_span_numbers_canvases_through_the_job_and_times_the_queue_wait():
    exporter = InMemorySpanExporter()
    setup_tracing("blockpress-test", processors=(SimpleSpanProcessor(exporter),))
    tracer = trace.get_tracer("test")
    now = time.time()
    spec = JobSpec(job_id="job-counted", model="tiny", kind="agent", submitted_at=now - 0.25)
    claim = Claim(spec, "1-0", "replica-0", 1, 1, None, claimed_at=now - 0.05)
    with replica_span(claim):
        for _ in range(3):
            with tracer.start_as_current_span(SpanName.AGENT_TURN):
                list(trace_stream(_fake_stream(0)))
    with replica_span(claim):  # the next job (or attempt) counts afresh
        list(trace_stream(_fake_stream(0)))
    finished = exporter.get_finished_spans()
    indices = [s.attributes[Attr.CANVAS_INDEX] for s in finished if s.name == SpanName.ENGINE_CANVAS]
    assert indices == [0, 1, 2, 0]
    wait = next(s for s in finished if s.name == SpanName.QUEUE_WAIT)
    assert interval(wait) == (int((now - 0.25) * 1e9), int((now - 0.05) * 1e9))
    run = next(s for s in finished if s.name == SpanName.REPLICA_RUN)
    assert wait.end_time <= run.start_time  # type: ignore[operator]
