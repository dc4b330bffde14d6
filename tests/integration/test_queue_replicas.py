"""Replicas (real Ray actors, real engine on a tiny checkpoint) pulling jobs from the real queue."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from blockpress.runtime.contracts.jobs import Event, JobSpec, JobState
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.pool import ReplicaPool

pytestmark = pytest.mark.slow

# One canvas, two steps: the cheapest real generation.
FAST = {"max_new_tokens": 32, "max_denoising_steps": 2, "seed": 1}
# Fixed steps and no stop token: 32 canvases of 64 steps, far longer than it takes to act on a running job.
LONG = {"max_new_tokens": 1024, "max_denoising_steps": 64, "confidence_threshold": 0, "stop_token_ids": []}
LONG_CANVASES = 1024 // 32
QUEUE_OPTIONS = {"lease_s": 2.0, "max_deliveries": 3}


@pytest.fixture
def pool(ray_cluster: Any, redis_server: Any, tiny_checkpoint: Path) -> Iterator[ReplicaPool]:
    pool = ReplicaPool(
        str(tiny_checkpoint),
        2,
        redis_url=redis_server.url,
        queue_options=QUEUE_OPTIONS,
        device="cpu",
        name_prefix=f"t{uuid.uuid4().hex[:6]}-",
        torch_threads=1,
    )
    pool.start(timeout_s=240)
    yield pool
    pool.stop(drain_s=10)


@pytest.fixture
async def queue(redis_server: Any) -> AsyncIterator[JobQueue]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield JobQueue(client, **QUEUE_OPTIONS)
    await client.aclose()


async def wait_final(queue: JobQueue, job_id: str, timeout_s: float = 120) -> list[Event]:
    """Follows the job's events like a watching client until its final event; returns them all."""
    events: list[Event] = []
    give_up = time.monotonic() + timeout_s
    while not (events and events[-1].is_final):
        if time.monotonic() > give_up:
            record = await queue.get(job_id)
            raise AssertionError(f"job {job_id} not final: {[e.type for e in events]}; {record}")
        events += await queue.read_events(job_id, after=events[-1].id if events else "0", block_ms=500)
    return events


async def test_replicas_run_jobs_from_concurrent_clients(pool: ReplicaPool, queue: JobQueue) -> None:
    model = pool.model

    async def client(n: int) -> list[str]:
        ids = []
        for i in range(3):
            job_id = f"c{n}-{i}-{uuid.uuid4().hex[:6]}"
            if i == 1:
                job = JobSpec(job_id=job_id, model=model, messages=[{"role": "user", "content": "hi"}], settings=FAST)
            else:
                job = JobSpec(job_id=job_id, model=model, prompt=f"hello {n}", settings=FAST, drafts=i == 2)
            await queue.submit(job)
            ids.append(job_id)
        return ids

    # The tiny checkpoint's context is 4096 tokens; one byte-level token per character.
    bad = JobSpec(job_id=f"bad-{uuid.uuid4().hex[:6]}", model=model, prompt="x" * 5000, settings=FAST)
    await queue.submit(bad)
    batches = await asyncio.gather(*(client(n) for n in range(3)))
    replicas_seen = set()
    for job_id in [j for batch in batches for j in batch]:
        events = await wait_final(queue, job_id)
        record = await queue.get(job_id)
        assert record.state is JobState.SUCCEEDED, (job_id, record.error)
        types = [e.type for e in events]
        assert types[0] == "queued" and types[1] == "started" and types[-1] == "completed"
        assert sum(e.is_final for e in events) == 1
        canvases = [e.data for e in events if e.type == "canvas"]
        assert len(canvases) == 1 and canvases[0]["steps"] <= 2 and canvases[0]["index"] == 0
        completed = events[-1].data
        assert completed == record.result
        assert completed["usage"]["completion_tokens"] == len(completed["token_ids"]) <= 32
        assert completed["usage"]["prompt_tokens"] > 0 and completed["timings"]["total_s"] > 0
        assert completed["text"].startswith(canvases[0]["text"][:1])
        if record.spec.drafts:
            assert any(e.type == "draft" for e in events)
        else:
            assert not any(e.type == "draft" for e in events)
        replicas_seen.add(events[1].data["replica"])
    assert replicas_seen <= set(pool.replica_ids())
    await wait_final(queue, bad.job_id)
    failed = await queue.get(bad.job_id)
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error["code"] == "INVALID_ARGUMENT" and "4096" in failed.error["message"]
    assert await queue.live_replicas(model) == 2
    assert sum(info["jobs_done"] for info in pool.infos()) == 10


async def test_cancelling_a_running_job_stops_it_and_the_replica_goes_on(pool: ReplicaPool, queue: JobQueue) -> None:
    jobs = [JobSpec(job_id=f"long-{i}-{uuid.uuid4().hex[:6]}", model=pool.model, prompt="go", settings=LONG)
            for i in range(2)]  # fmt: skip
    for job in jobs:
        await queue.submit(job)
    for job in jobs:  # both replicas busy with a long job
        events: list[Event] = []
        while not any(e.type == "started" for e in events):
            events += await queue.read_events(job.job_id, after=events[-1].id if events else "0", block_ms=500)
    for job in jobs:
        assert (await queue.cancel(job.job_id)).state is JobState.RUNNING
    for job in jobs:
        events = await wait_final(queue, job.job_id, timeout_s=120)
        assert events[-1].type == "cancelled" and not any(e.type == "completed" for e in events)
        assert (await queue.get(job.job_id)).state is JobState.CANCELLED
        # Stopped mid-job, not at its end: the engine checks the flag before every step.
        assert sum(e.type == "canvas" for e in events) < LONG_CANVASES
    after = JobSpec(job_id=f"after-{uuid.uuid4().hex[:6]}", model=pool.model, prompt="again", settings=FAST)
    await queue.submit(after)
    assert (await wait_final(queue, after.job_id))[-1].type == "completed"
