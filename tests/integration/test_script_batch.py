"""Submits made in one event-loop turn share a Redis pipeline (`runtime/queue/batch.py`), each with its
own outcome: created, refused, a conflict, a foreign key, a forgotten script."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ResponseError

from blockpress.runtime.contracts.errors import JobIdConflict, QueueFull
from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.contracts.keys import Keys
from blockpress.runtime.queue.jobqueue import JobQueue

MODEL = "batched"


def spec(job_id: str, **fields: Any) -> JobSpec:
    return JobSpec(job_id=job_id, model=MODEL, prompt=f"prompt of {job_id}", **fields)


async def test_concurrent_submits_share_a_pipeline_and_keep_their_own_outcomes(redis_client: Any) -> None:
    queue = JobQueue(redis_client, max_queue_per_model=40)
    await queue.submit(spec("taken", settings={"seed": 1}))
    await redis_client.set(Keys().job("foreign"), "not a hash")
    sent = [queue.submit(spec(f"b{i}")) for i in range(45)]
    sent += [queue.submit(spec("taken", settings={"seed": 2})), queue.submit(spec("foreign"))]
    outcomes = await asyncio.gather(*sent, return_exceptions=True)
    created = [o for o in outcomes[:45] if isinstance(o, tuple)]
    assert len(created) == 39 and all(c for _, c in created)  # 40 minus "taken", the rest refused
    assert all(isinstance(o, QueueFull) for o in outcomes[:45] if not isinstance(o, tuple))
    assert isinstance(outcomes[45], JobIdConflict)
    assert isinstance(outcomes[46], ResponseError) and "BPKEYTYPE" in str(outcomes[46])
    assert await queue.depth(MODEL) == 40
    for record, _ in created:
        assert (await queue.get(record.job_id)).state is JobState.QUEUED


async def test_a_forgotten_script_is_loaded_again_inside_a_batch(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    await queue.submit(spec("before"))
    await redis_client.script_flush()  # as a Redis restarted without persistence forgets scripts
    outcomes = await asyncio.gather(*(queue.submit(spec(f"after{i}")) for i in range(5)))
    assert [created for _, created in outcomes] == [True] * 5
    assert await queue.depth(MODEL) == 6


async def test_a_connection_failure_reaches_every_call_of_the_batch(tmp_path: Any) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = aioredis.Redis.from_url(f"unix://{tmp_path}/nobody-listens.sock", retry=None)
    queue = JobQueue(client)
    outcomes = await asyncio.gather(*(queue.submit(spec(f"lost{i}")) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
    with pytest.raises(RedisConnectionError):  # a lone call too, which takes no pipeline
        await queue.submit(spec("lost-again"))
    await client.aclose()
