"""An agent task end to end: gRPC gateway, real Redis, the replica's job runner, the agent loop.

The runner is the one every replica runs (`blockpress.workers.runner.JobRunner`), here in-process
on a `FakeEngine` with the scripted model as the agent's model: a random-weight checkpoint never calls
a tool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockpress.agents.model import Message
from blockpress.agents.testing import ScriptedModel, call
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.runner import JobRunner
from blockpress.workers.testing import FakeEngine


def _answer(messages: Sequence[Message]) -> str:
    return f"37*41+12 = {messages[-1]['content']['result']}.<turn|>"


@pytest.fixture
async def service(redis_client: Any, tiny_checkpoint: Path) -> AsyncIterator[tuple[pb_grpc.RuntimeStub, ScriptedModel]]:
    card = load_model_card(str(tiny_checkpoint))
    queue = JobQueue(redis_client)
    gateway = Gateway(RuntimeSettings(port=0), queue, {card.name: card})
    await gateway.start()
    model = ScriptedModel([call("calculator", expression="37*41+12"), _answer])
    runner = JobRunner(
        FakeEngine(), queue, model=card.name, replica_id="replica-1", agent_options=lambda _: {"model": model}
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, block_ms=200))
    await queue.beat(card.name, "replica-1")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    yield pb_grpc.RuntimeStub(channel), model
    stop.set()
    await asyncio.wait_for(task, 30)
    await channel.close()
    await gateway.stop(grace=0)


async def test_an_agent_task_calls_a_tool_and_answers_through_the_service(
    service: tuple[pb_grpc.RuntimeStub, ScriptedModel],
) -> None:
    stub, model = service
    request = pb.SubmitRequest(
        job_id="agent-e2e-1", agent=pb.AgentTask(task="What is 37*41+12?", tools=["calculator"], max_turns=4)
    )
    events = [e async for e in stub.Generate(request, timeout=60)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "completed", kinds
    assert kinds.count("turn") == 2 and kinds.index("tool_call") < kinds.index("tool_result")
    tool_call = next(e.tool_call for e in events if e.WhichOneof("event") == "tool_call")
    assert (tool_call.name, json.loads(tool_call.arguments_json)) == ("calculator", {"expression": "37*41+12"})
    tool_result = next(e.tool_result for e in events if e.WhichOneof("event") == "tool_result")
    assert not tool_result.is_error and json.loads(tool_result.content) == {"result": 1529}
    completed = events[-1].completed
    assert completed.text == "37*41+12 = 1529." and completed.stop_reason == "final_answer"
    assert model.tools_seen == [["calculator"], ["calculator"]]
    job = await stub.GetJob(pb.GetJobRequest(job_id="agent-e2e-1"))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.kind == "agent"
