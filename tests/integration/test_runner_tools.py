"""Client-side tool calls and session reuse through the replica's job runner: real Redis, the real
engine on the tiny checkpoint.

A random-weight checkpoint never writes a tool call by itself, so `_PinnedEngine` passes the engine's
own `template=` (pinned tokens) to every generation: the engine still denoises, commits canvas by
canvas and cuts at the token limit; only the pinned positions are fixed. The runner's part (rendering
the tools, stopping at the canvas that completes a call, parsing it) is what is under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from blockpress.agents.toolcalls import ToolCall, render_call
from blockpress.runtime import AsyncClient
from blockpress.runtime import ToolCall as ClientToolCall
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.metrics import get_metrics
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.runtime.tracing.telemetry import Attr, SpanName, setup_tracing
from blockpress.workers.engine import DiffusionEngine
from blockpress.workers.runner import JobRunner

pytestmark = pytest.mark.slow

# Four canvases of 32 tokens at two steps each, with no stop token: without the tool-call stop the
# engine would always run all four.
SETTINGS = {"max_new_tokens": 128, "max_denoising_steps": 2, "stop_token_ids": [], "seed": 3}
SHORT = {"max_new_tokens": 32, "max_denoising_steps": 2, "seed": 3}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
# 53 tokens with the byte-level tokenizer: the call opens in canvas 0 and closes in canvas 1.
CALL_TEXT = "Let me check. " + render_call(ToolCall("get_weather", {"city": "Paris", "days": 3}))


class _PinnedEngine:
    """The real engine with the first new tokens of every generation pinned to `text`."""

    def __init__(self, engine: DiffusionEngine, text: str) -> None:
        self._engine = engine
        self.template: list[int | None] = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        self.prompts: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, prompt: Any, settings: Any = None, **kwargs: Any) -> Iterator[Any]:
        self.prompts.append(list(prompt))
        return self._engine.stream(prompt, settings, template=self.template, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained(str(tiny_checkpoint), device="cpu")


async def run_one(runner: JobRunner, queue: JobQueue, spec: JobSpec) -> dict[str, Any]:
    """Submits `spec`, runs it on `runner` and returns its `completed` payload (and checks the events)."""
    await queue.submit(spec)
    claim = await queue.claim(runner.model, runner.replica_id, block_ms=1000)
    assert claim is not None and claim.job_id == spec.job_id
    assert await runner.run_job(claim) is JobState.SUCCEEDED
    record = await queue.get(spec.job_id)
    events = await queue.read_events(spec.job_id)
    assert events[-1].type == "completed" and events[-1].data == record.result
    assert record.result is not None
    return {**record.result, "canvas_events": sum(e.type == "canvas" for e in events)}


def weather_job(job_id: str, *, tools: list[dict[str, Any]]) -> JobSpec:
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    return JobSpec(job_id=job_id, model="tiny", messages=messages, tools=tools, settings=SETTINGS)


async def test_a_generation_with_client_tools_stops_at_the_canvas_that_completes_a_call(
    redis_client: Any, engine: DiffusionEngine
) -> None:
    queue = JobQueue(redis_client)
    pinned = _PinnedEngine(engine, CALL_TEXT)
    runner = JobRunner(pinned, queue, model="tiny", replica_id="r1")
    metrics = get_metrics()
    before = metrics.registry.get_sample_value("blockpress_jobs_total", {"model": "tiny", "state": "SUCCEEDED"}) or 0
    spans = InMemorySpanExporter()
    setup_tracing("blockpress-test", processors=(SimpleSpanProcessor(spans),))
    try:
        done = await run_one(runner, queue, weather_job("tools-1", tools=[WEATHER]))
        finished = spans.get_finished_spans()
    finally:
        spans.shutdown()  # the process-wide provider keeps the processor; an exporter shut down drops spans

    assert done["stop_reason"] == "tool_call"
    assert done["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]
    assert done["text"] == "Let me check."
    # Stopped after canvas 1 (where the call closed), not at the token limit's four canvases.
    assert done["canvases"] == done["canvas_events"] == 2
    assert done["usage"]["completion_tokens"] == len(done["token_ids"]) == 64
    # The prompt was rendered with the client's tool declaration.
    prompt = engine.decode(pinned.prompts[0])
    assert "<|tool>declaration:get_weather{" in prompt
    assert done["usage"]["prompt_tokens"] == len(pinned.prompts[0]) == done["usage"]["prefilled_tokens"]
    assert done["timings"]["first_canvas_s"] > 0 and done["timings"]["total_s"] >= done["timings"]["first_canvas_s"]

    after = metrics.registry.get_sample_value("blockpress_jobs_total", {"model": "tiny", "state": "SUCCEEDED"})
    assert after == before + 1
    steps = metrics.registry.get_sample_value("blockpress_steps_per_canvas_count", {"model": "tiny"})
    assert steps is not None and steps >= 2
    (run,) = [s for s in finished if s.name == SpanName.REPLICA_RUN]
    assert run.attributes is not None
    assert run.attributes[Attr.JOB_STATE] == "SUCCEEDED" and run.attributes[Attr.GEN_AI_OUTPUT_TOKENS] == 64
    assert run.attributes[Attr.STOP_REASON] == "tool_call"

    # The same pinned output without client tools is plain text: no stop, no parsing, four canvases.
    plain = await run_one(runner, queue, weather_job("tools-2", tools=[]))
    assert plain["stop_reason"] == "max_new_tokens" and "tool_calls" not in plain
    assert plain["canvases"] == 4 and plain["text"].startswith(CALL_TEXT)


async def test_a_malformed_call_comes_back_as_the_models_text_with_its_reason(
    redis_client: Any, engine: DiffusionEngine
) -> None:
    queue = JobQueue(redis_client)
    # A bare string argument is not Gemma 4 syntax (strings are wrapped in <|"|>).
    runner = JobRunner(_PinnedEngine(engine, "<|tool_call>call:get_weather{city:Paris}<tool_call|>"), queue,
                       model="tiny", replica_id="r1")  # fmt: skip
    done = await run_one(runner, queue, weather_job("bad-call-1", tools=[WEATHER]))
    assert done["stop_reason"] == "malformed_tool_call" and done["tool_calls"] == []
    assert done["canvases"] == 1 and done["text"].startswith("<|tool_call>call:get_weather{city:Paris}")


async def test_the_sdk_gets_the_parsed_tool_calls_through_the_gateway(
    redis_client: Any, engine: DiffusionEngine, tiny_checkpoint: Path
) -> None:
    card = await asyncio.to_thread(load_model_card, str(tiny_checkpoint))
    queue = JobQueue(redis_client)
    gateway = Gateway(RuntimeSettings(port=0), queue, {card.name: card})
    await gateway.start()
    runner = JobRunner(_PinnedEngine(engine, CALL_TEXT), queue, model=card.name, replica_id="r1")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, block_ms=100))
    await queue.beat(card.name, "r1")
    try:
        async with AsyncClient(f"127.0.0.1:{gateway.port}", timeout=60) as client:
            messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
            result = await client.generate(messages, tools=[WEATHER], **SETTINGS)
            # GetJob carries them too (as JSON text in the proto).
            job = await client.get_job(result.job_id)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await gateway.stop(grace=0)
    assert result.stop_reason == "tool_call" and result.text == "Let me check."
    assert result.tool_calls == (ClientToolCall("get_weather", {"city": "Paris", "days": 3}),)
    assert job.result is not None
    assert job.result.tool_calls == (ClientToolCall("get_weather", {"city": "Paris", "days": 3}),)


def turn(job_id: str, session: str | None, *extra: str) -> JobSpec:
    """A conversation `hi` followed by (assistant, user) pairs from `extra`."""
    messages = [{"role": "user", "content": "hi"}]
    for i, text in enumerate(extra):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return JobSpec(job_id=job_id, model="tiny", messages=messages, settings=SHORT, session_id=session)


async def test_a_session_prefills_only_the_new_tokens_of_its_next_turn(
    redis_client: Any, engine: DiffusionEngine
) -> None:
    runner = JobRunner(engine, JobQueue(redis_client), model="tiny", replica_id="r1")
    first = await run_one(runner, runner.queue, turn("s-1", "chat-a"))
    assert first["usage"]["prefilled_tokens"] == first["usage"]["prompt_tokens"]
    second = await run_one(runner, runner.queue, turn("s-2", "chat-a", "Hello there.", "Tell me more."))
    usage = second["usage"]
    assert 0 < usage["prefilled_tokens"] == usage["prompt_tokens"] - first["usage"]["prompt_tokens"]
    # Another conversation with the same messages has no cache to start from.
    cold = await run_one(runner, runner.queue, turn("s-3", "chat-b", "Hello there.", "Tell me more."))
    assert cold["usage"]["prefilled_tokens"] == cold["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    # Without a session id nothing is kept.
    await run_one(runner, runner.queue, turn("s-4", None))
    assert runner.sessions.keys() == ["chat-a", "chat-b"]


async def test_the_least_recently_used_session_is_dropped(redis_client: Any, engine: DiffusionEngine) -> None:
    runner = JobRunner(engine, JobQueue(redis_client), model="tiny", replica_id="r1", max_sessions=2)
    for session in ("a", "b"):
        await run_one(runner, runner.queue, turn(f"lru-{session}-1", session))
    hit = await run_one(runner, runner.queue, turn("lru-a-2", "a", "Hello.", "More."))  # a is now the most recent
    assert hit["usage"]["prefilled_tokens"] < hit["usage"]["prompt_tokens"]
    await run_one(runner, runner.queue, turn("lru-c-1", "c"))  # a third session: b goes
    assert runner.sessions.keys() == ["a", "c"]
    miss = await run_one(runner, runner.queue, turn("lru-b-2", "b", "Hello.", "More."))
    assert miss["usage"]["prefilled_tokens"] == miss["usage"]["prompt_tokens"]
    assert runner.sessions.keys() == ["c", "b"]
