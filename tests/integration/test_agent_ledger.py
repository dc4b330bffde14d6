"""The agent ledger against a real redis-server and the real job queue: a redelivered agent job
resumes after its last completed turn, its tools run once, and a superseded attempt cannot write."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from blockpress.agents import AgentLoop, AgentTask, ToolRegistry, tool
from blockpress.agents.errors import Superseded
from blockpress.agents.model import Message
from blockpress.agents.testing import ScriptedModel, call
from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.contracts.keys import Keys
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.ledger import RedisLedger


@pytest.fixture
def queue(redis_client: Any) -> JobQueue:
    return JobQueue(redis_client, lease_s=0.3)


class _ReplicaDied(Exception):
    pass


def _die(_: Sequence[Message]) -> str:
    raise _ReplicaDied


async def test_a_redelivered_agent_job_resumes_and_runs_its_tool_once(queue: JobQueue, redis_server: Any) -> None:
    charges: list[int] = []

    @tool(isolated=False)  # records into this process; the ledger, not isolation, is under test
    def charge(cents: int) -> str:
        """Charges a card; must never run twice."""
        charges.append(cents)
        return f"charged {cents}"

    registry = ToolRegistry([charge])
    spec = JobSpec(job_id="agent-1", model="tiny", kind="agent", agent={"task": "charge 500", "tools": ["charge"]})
    task = AgentTask.from_instructions("charge 500", tools=("charge",))
    await queue.submit(spec)
    sync = redis.Redis.from_url(redis_server.url)

    first = await queue.claim("tiny", "replica-a", block_ms=1000)
    assert first is not None and first.attempt == 1
    ledger_a = RedisLedger.from_url(redis_server.url, spec.job_id, first.attempt)
    with pytest.raises(_ReplicaDied):  # the replica dies after the tool ran, before turn 2 ends
        AgentLoop(ScriptedModel([call("charge", cents=500), _die]), registry, ledger=ledger_a).run(task)
    assert charges == [500]

    await asyncio.sleep(0.5)  # past the lease: the job is claimable again
    second = await queue.claim("tiny", "replica-b", block_ms=1000)
    assert second is not None and second.attempt == 2 and second.job_id == spec.job_id
    model = ScriptedModel([lambda m: f"Done: {m[-1]['content']['result']}.<turn|>"])
    result = AgentLoop(model, registry, ledger=RedisLedger(sync, spec.job_id, second.attempt)).run(task)
    assert charges == [500] and result.text == "Done: charged 500."
    assert model.requests[0][-1] == {"role": "tool", "name": "charge", "content": {"result": "charged 500"}}

    # The first replica, back from a pause, can neither record a turn nor (so) run another tool.
    with pytest.raises(Superseded):
        ledger_a.put(1, {"turn": 1})
    assert await queue.finish(second, JobState.SUCCEEDED, result={"text": result.text})
    assert (await queue.get(spec.job_id)).state is JobState.SUCCEEDED
    assert sync.ttl(Keys().ledger(spec.job_id)) > 0
    sync.close()
