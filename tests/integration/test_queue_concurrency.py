"""Many producers and consumers at once, with crashing and stalling consumers: every job ends once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.contracts.keys import GROUP, Keys
from blockpress.runtime.queue.jobqueue import Claim, JobQueue

MODEL = "tiny"
PRODUCERS, JOBS_EACH, CONSUMERS = 8, 25, 4


async def produce(queue: JobQueue, producer: int, rng: random.Random) -> list[str]:
    ids = [f"p{producer}-{i}" for i in range(JOBS_EACH)]
    for job_id in ids:
        await queue.submit(JobSpec(job_id=job_id, model=MODEL, prompt=job_id))
        if rng.random() < 0.2:  # a client retrying a submit it never saw the answer to
            _, created = await queue.submit(JobSpec(job_id=job_id, model=MODEL, prompt=job_id))
            assert not created
        await asyncio.sleep(0)
    return ids


async def consume(queue: JobQueue, name: str, rng: random.Random, done: asyncio.Event) -> dict[str, int]:
    counts = {"finished": 0, "crashed": 0, "stale": 0}
    stalled: list[Claim] = []
    while not done.is_set():
        claim = await queue.claim(MODEL, name, block_ms=50)
        if claim is None:
            continue
        roll = rng.random()
        if roll < 0.1:
            counts["crashed"] += 1  # dies silently: the lease must bring the job back
            continue
        if roll < 0.15:
            stalled.append(claim)  # pauses past its lease, then tries to finish anyway
            continue
        await queue.append_event(claim, "canvas", {"index": 0, "text": claim.job_id, "steps": 1, "tokens": 1})
        assert await queue.finish(claim, JobState.SUCCEEDED, result={"text": claim.job_id})
        counts["finished"] += 1
    for claim in stalled:  # by now every stalled job was redelivered and finished by someone else
        if not await queue.finish(claim, JobState.SUCCEEDED, result={"text": "stale " + claim.job_id}):
            counts["stale"] += 1
    return counts


async def test_every_job_from_concurrent_producers_ends_exactly_once(redis_client: Any) -> None:
    queue = JobQueue(redis_client, lease_s=0.3, max_deliveries=50, max_queue_per_model=10_000)
    rng = random.Random(4)
    done = asyncio.Event()
    consumers = [
        asyncio.create_task(consume(queue, f"r{i}", random.Random(rng.random()), done)) for i in range(CONSUMERS)
    ]
    batches = await asyncio.gather(*(produce(queue, p, random.Random(rng.random())) for p in range(PRODUCERS)))
    all_ids = [job_id for batch in batches for job_id in batch]

    async def all_final() -> None:
        while True:
            states = [(await queue.get(job_id)).state for job_id in all_ids]
            if all(state.is_final for state in states):
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(all_final(), 120)
    done.set()
    counts = await asyncio.gather(*consumers)

    for job_id in all_ids:
        record = await queue.get(job_id)
        assert record.state is JobState.SUCCEEDED, (job_id, record.state)
        assert record.result == {"text": job_id}, "a stale attempt's result never lands"
        events = await queue.read_events(job_id)
        finals = [e for e in events if e.is_final]
        assert len(finals) == 1 and finals[0].type == "completed", (job_id, [e.type for e in events])
        started = [e.data["attempt"] for e in events if e.type == "started"]
        assert started == list(range(1, record.attempt + 1)), "attempts count up by one per start"
    assert sum(c["finished"] for c in counts) == len(all_ids) == PRODUCERS * JOBS_EACH
    assert sum(c["crashed"] for c in counts) > 0, "the test must have exercised redelivery"
    assert sum(c["stale"] for c in counts) > 0, "the test must have exercised fencing"
    keys = Keys()
    assert await redis_client.xlen(keys.queue(MODEL)) == 0
    assert (await redis_client.xpending(keys.queue(MODEL), GROUP))["pending"] == 0
    assert await queue.depth(MODEL) == 0
