"""The SDK's agent calls end to end: Client / AsyncClient -> gRPC gateway -> real Redis -> job runner.

The runner is the one every replica runs (`blockpress.workers.runner.JobRunner`), in this process with
the scripted model standing in for the engine, so the tool call and the answer are known in advance:
a random-weight checkpoint never calls a tool, and the shipped tiny checkpoint may not yet be reliable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from blockpress.agents.model import Message
from blockpress.agents.testing import ScriptedModel, Turn, call
from blockpress.runtime import AgentResult, AgentToolCall, AsyncClient, Client, JobState
from blockpress.runtime.cli.embedded import server_tools
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.runner import JobRunner
from blockpress.workers.testing import FakeEngine

QUESTION = "What is 37*41+12?"


def answer(messages: Sequence[Message]) -> str:
    return f"37*41+12 = {messages[-1]['content']['result']}.<turn|>"


SOLVE: list[Turn] = [call("calculator", expression="37*41+12"), answer]


@contextlib.asynccontextmanager
async def running(
    redis_client: Any, checkpoint: Path, turns: Sequence[Turn], **settings: Any
) -> AsyncIterator[tuple[str, ScriptedModel, JobQueue]]:
    """Gateway on port 0 and one runner playing `turns`; yields the address, the model and the queue."""
    card = await asyncio.to_thread(load_model_card, str(checkpoint))
    queue = JobQueue(redis_client)
    gateway_settings = RuntimeSettings(port=0, **settings)
    gateway = Gateway(gateway_settings, queue, {card.name: card}, agent_tools=server_tools(gateway_settings))
    await gateway.start()
    model = ScriptedModel(turns)
    runner = JobRunner(
        FakeEngine(), queue, model=card.name, replica_id="replica-1", agent_options=lambda _: {"model": model}
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, block_ms=100))
    await queue.beat(card.name, "replica-1")
    try:
        yield f"127.0.0.1:{gateway.port}", model, queue
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await gateway.stop(grace=0)


def check_solved(result: AgentResult) -> None:
    assert result.text == "37*41+12 = 1529." and result.stop_reason == "final_answer"
    assert result.turns == 2 and result.job_id
    [tool_call] = result.tool_calls
    assert (tool_call.name, tool_call.arguments, tool_call.is_error) == (
        "calculator",
        {"expression": "37*41+12"},
        False,
    )
    assert tool_call.result is not None and json.loads(tool_call.result) == {"result": 1529}


async def test_client_agent_runs_a_tool_and_answers(redis_client: Any, tiny_checkpoint: Path) -> None:
    async with running(redis_client, tiny_checkpoint, SOLVE) as (address, model, _):

        def blocking() -> AgentResult:  # the blocking client, off the loop the gateway runs on
            with Client(address, timeout=60) as client:
                return client.agent(QUESTION, tools=["calculator"], max_turns=4, seed=3)

        result = await asyncio.to_thread(blocking)
    check_solved(result)
    assert isinstance(result.tool_calls[0], AgentToolCall)
    assert model.tools_seen == [["calculator"], ["calculator"]]
    assert model.requests[0][-1] == {"role": "user", "content": QUESTION}


async def test_client_agent_stream_and_submit_agent(redis_client: Any, tiny_checkpoint: Path) -> None:
    async with running(redis_client, tiny_checkpoint, [*SOLVE, *SOLVE]) as (address, _, _):

        def blocking() -> tuple[list[str], AgentResult, JobState]:
            with Client(address, timeout=60) as client:
                types = [e.type for e in client.agent_stream(QUESTION, tools="calculator")]
                handle = client.submit_agent(QUESTION, tools=["calculator"], job_id="agent-sdk-handle")
                result = handle.result(timeout=60)
                assert isinstance(result, AgentResult)
                return types, result, handle.status()

        types, result, state = await asyncio.to_thread(blocking)
    assert types[:3] == ["queued", "started", "turn"] and types[-1] == "completed"
    assert types.count("turn") == 2 and types.index("tool_call") < types.index("tool_result")
    check_solved(result)
    assert result.job_id == "agent-sdk-handle" and state is JobState.SUCCEEDED


async def test_async_client_mirrors_the_agent_calls(redis_client: Any, tiny_checkpoint: Path) -> None:
    async with (
        running(redis_client, tiny_checkpoint, [*SOLVE, *SOLVE, *SOLVE]) as (address, _, _),
        AsyncClient(address, timeout=60) as client,
    ):
        check_solved(await client.agent(QUESTION, tools=["calculator"]))
        events = [e async for e in client.agent_stream(QUESTION, tools=["calculator"])]
        assert events[-1].type == "completed" and events[-1].data["text"] == "37*41+12 = 1529."
        handle = await client.submit_agent(QUESTION, tools=["calculator"])
        result = await handle.result(timeout=60)
        assert isinstance(result, AgentResult)
        check_solved(result)
        assert await handle.status() is JobState.SUCCEEDED


async def test_a_turn_limit_ends_the_task_with_its_reason(redis_client: Any, tiny_checkpoint: Path) -> None:
    # The gateway's default turn limit applies to a task that sets none.
    loop = [call("calculator", expression="1+1")] * 3
    async with (
        running(redis_client, tiny_checkpoint, loop, agent_default_max_turns=2) as (address, model, _),
        AsyncClient(address, timeout=60) as client,
    ):
        result = await client.agent("Keep adding", tools=["calculator"])
    assert result.stop_reason == "max_turns" and result.turns == 2
    assert [c.name for c in result.tool_calls] == ["calculator", "calculator"]
    assert len(model.requests) == 2


async def test_an_unknown_tool_is_refused_before_anything_is_queued(redis_client: Any, tiny_checkpoint: Path) -> None:
    async with (
        running(redis_client, tiny_checkpoint, SOLVE) as (address, model, queue),
        AsyncClient(address, timeout=30) as client,
    ):
        with pytest.raises(InvalidArgument) as bad:
            await client.agent(QUESTION, tools=["calculator", "shell"])
        with pytest.raises(InvalidArgument, match="http_get"):  # off without allowed hosts
            await client.submit_agent(QUESTION, tools=["http_get"])
        (info,) = await client.models()
        depth = await queue.depth(info.name)
    assert bad.value.field == "agent.tools"
    assert "'shell'" in bad.value.message and "calculator" in bad.value.message
    assert depth == 0 and info.queue_depth == 0 and model.requests == []


async def test_client_trace_shows_where_the_agent_task_s_time_went(
    redis_client: Any, redis_server: Any, tiny_checkpoint: Path
) -> None:
    from blockpress.runtime.contracts.errors import NotFound
    from blockpress.runtime.tracing.telemetry import Attr, SpanName, setup_tracing

    # The process-wide provider keeps finished spans in this Redis, as `blockpress serve` does.
    setup_tracing("blockpress-test", redis_url=redis_server.url)
    async with (
        running(redis_client, tiny_checkpoint, SOLVE, redis_url=redis_server.url) as (address, _, _),
        AsyncClient(address, timeout=30) as client,
    ):
        result = await client.agent(QUESTION, tools=["calculator"], job_id="agent-traced")
        wanted = {"gateway.Generate", SpanName.QUEUE_WAIT, SpanName.REPLICA_RUN, SpanName.AGENT_TOOL}
        spans: list[Any] = []
        for _ in range(200):  # the store writes off the hot path, moments after the job ends
            with contextlib.suppress(NotFound):
                spans = await client.trace(result.job_id)
            if wanted <= {s.name for s in spans}:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(NotFound, match="no trace kept"):
            await client.trace("no-such-job")
        with pytest.raises(InvalidArgument) as empty:
            await client.trace("")

        def blocking() -> list[Any]:
            with Client(address, timeout=30) as sync_client:
                return sync_client.trace(result.job_id)

        again = await asyncio.to_thread(blocking)
    names = [s.name for s in spans]
    assert wanted <= set(names), names
    assert names.count(SpanName.AGENT_TURN) == 2 and names.count(SpanName.AGENT_TOOL) == 1
    assert len({s.trace_id for s in spans}) == 1
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent_id is None]
    assert root.name == "gateway.Generate" and root.attributes[Attr.RPC_METHOD] == "Generate"
    (tool,) = [s for s in spans if s.name == SpanName.AGENT_TOOL]
    assert tool.attributes["gen_ai.tool.name"] == "calculator"
    assert tool.attributes["blockpress.tool.outcome"] == "ok"
    # Every span hangs off the one root, and a child starts no earlier than its parent.
    for s in spans:
        if s.parent_id is not None:
            parent = by_id[s.parent_id]
            assert parent.start_ns <= s.start_ns <= s.end_ns
    (run,) = [s for s in spans if s.name == SpanName.REPLICA_RUN]
    assert run.attributes[Attr.JOB_ID] == "agent-traced" and run.attributes[Attr.JOB_KIND] == "agent"
    assert [s.span_id for s in spans] == [s.span_id for s in again][: len(spans)]
    assert empty.value.field == "job_id"
