"""`blockpress agent` and `blockpress trace` as a user runs them: the real command in a subprocess,
against a real gRPC gateway, real Redis and the replica's job runner.

The runner plays a scripted model (`blockpress.agents.testing`), so the tool call and the answer are
known: a random-weight checkpoint never calls a tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from blockpress.agents.model import Message
from blockpress.agents.testing import ScriptedModel, call
from blockpress.runtime.cli.embedded import server_tools
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.runtime.tracing.telemetry import SpanName, setup_tracing
from blockpress.workers.runner import JobRunner
from blockpress.workers.testing import FakeEngine


def answer(messages: Sequence[Message]) -> str:
    return f"The answer is {messages[-1]['content']['result']}.<turn|>"


@contextlib.asynccontextmanager
async def running(redis_client: Any, redis_url: str, checkpoint: Path, turns: list[Any]) -> AsyncIterator[str]:
    card = await asyncio.to_thread(load_model_card, str(checkpoint))
    queue = JobQueue(redis_client)
    gateway_settings = RuntimeSettings(port=0, redis_url=redis_url)
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
        yield f"127.0.0.1:{gateway.port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await gateway.stop(grace=0)


async def blockpress(*args: str) -> tuple[int, str, str]:
    """Runs the command without blocking the loop the gateway serves on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blockpress.runtime.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_agent_command_streams_the_tool_call_and_prints_the_answer(
    redis_client: Any, redis_server: Any, tiny_checkpoint: Path
) -> None:
    setup_tracing("blockpress-test", redis_url=redis_server.url)
    script = [call("calculator", expression="37*41+12"), answer]
    async with running(redis_client, redis_server.url, tiny_checkpoint, script) as address:
        code, out, err = await blockpress(
            "agent", "What is 37*41+12?", "--tool", "calculator", "--max-turns", "4",
            "--max-new-tokens", "512", "--max-seconds", "60", "--job-id", "cli-agent-1", "--address", address,
        )  # fmt: skip
        assert code == 0, err
        # The answer alone on stdout, so it can be piped; the progress on stderr, in the order it came.
        assert out == "The answer is 1529.\n"
        lines = err.splitlines()
        assert lines[0].startswith("[started on replica-1, attempt 1]")
        tool_call = lines.index('-> calculator {"expression": "37*41+12"}')
        tool_result = next(i for i, line in enumerate(lines) if line.startswith("<- calculator result:"))
        assert [line for line in lines if line.startswith("[turn")] == ["[turn 0]", "[turn 1]"]
        assert lines.index("[turn 0]") < tool_call < tool_result < lines.index("[turn 1]")
        assert json.loads(lines[tool_result].partition("result: ")[2]) == {"result": 1529}
        assert lines[-1] == "[job cli-agent-1: 2 turns, 1 tool calls, stop: final_answer]"

        # The same job's trace through the gateway, as `blockpress trace` reads it after a `serve`.
        for _ in range(100):  # the trace store writes moments after the job ends
            code, out, err = await blockpress("trace", "cli-agent-1", "--json", "--address", address)
            names = {s["name"] for s in json.loads(out)["spans"]} if code == 0 else set()
            if {SpanName.REPLICA_RUN, SpanName.AGENT_TOOL} <= names:
                break
            await asyncio.sleep(0.1)
        assert {"gateway.Generate", SpanName.REPLICA_RUN, SpanName.AGENT_TURN, SpanName.AGENT_TOOL} <= names, err
        assert json.loads(out)["job_id"] == "cli-agent-1"

        code, _, err = await blockpress("trace", "no-such-job", "--address", address)
        assert code == 1 and "no trace kept" in err


async def test_agent_command_refuses_an_unknown_tool(redis_client: Any, redis_server: Any, tiny_checkpoint: Path):
    async with running(redis_client, redis_server.url, tiny_checkpoint, []) as address:
        code, out, err = await blockpress("agent", "hi", "--tool", "calculator", "--tool", "rm", "--address", address)
    assert code == 2 and out == ""
    assert "INVALID_ARGUMENT: agent.tools: unknown tool 'rm'" in err and "calculator" in err


async def test_agent_command_reports_a_turn_limit(redis_client: Any, redis_server: Any, tiny_checkpoint: Path):
    script = [call("calculator", expression="1+1")]
    async with running(redis_client, redis_server.url, tiny_checkpoint, script) as address:
        code, _, err = await blockpress(
            "agent", "add", "--tool", "calculator", "--max-turns", "1", "--address", address
        )
    assert code == 1, err
    assert err.splitlines()[-1].endswith("1 turns, 1 tool calls, stop: max_turns]")
