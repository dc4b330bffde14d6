"""Faults of replicas and of Redis: nothing accepted is lost, nothing ends twice.

Real parts throughout: Ray actors holding the engine on a tiny checkpoint, a real redis-server with
its append-only file, kill -9 of real processes. Replicas run with the test's fault injector
(`blockpress.workers.testing.PromptFaults`), which lets a prompt ask the runner to crash; a replica
without one never looks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from blockpress.runtime.contracts.jobs import Event, JobSpec, JobState
from blockpress.runtime.contracts.keys import GROUP, Keys
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.pool import ReplicaPool
from blockpress.workers.testing import PromptFaults

pytestmark = pytest.mark.slow

FAST = {"max_new_tokens": 32, "max_denoising_steps": 2, "seed": 1}
LONG = {"max_new_tokens": 96, "max_denoising_steps": 40, "confidence_threshold": 0, "stop_token_ids": []}
QUEUE_OPTIONS = {"lease_s": 2.0, "max_deliveries": 2}

PoolFactory = Callable[[str], ReplicaPool]


@pytest.fixture
def make_pool(ray_cluster: Any, tiny_checkpoint: Path) -> Iterator[PoolFactory]:
    pools: list[ReplicaPool] = []

    def make(redis_url: str) -> ReplicaPool:
        pool = ReplicaPool(
            str(tiny_checkpoint),
            1,
            redis_url=redis_url,
            queue_options=QUEUE_OPTIONS,
            device="cpu",
            faults=PromptFaults(),
            name_prefix=f"f{uuid.uuid4().hex[:6]}-",
            torch_threads=1,
        )
        pools.append(pool)
        pool.start(timeout_s=240)
        return pool

    yield make
    for pool in pools:
        pool.stop(drain_s=5)


@pytest.fixture
async def queue(redis_server: Any) -> AsyncIterator[JobQueue]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield JobQueue(client, **QUEUE_OPTIONS)
    await client.aclose()


def job(model: str, prompt: str, settings: dict[str, Any] = FAST) -> JobSpec:
    return JobSpec(
        job_id=f"{prompt.split()[0][:20]}-{uuid.uuid4().hex[:8]}", model=model, prompt=prompt, settings=settings
    )


async def follow(queue: JobQueue, job_id: str, until: Callable[[Event], bool], timeout_s: float = 180) -> list[Event]:
    """A watching client: reads the job's events, riding out Redis outages, until `until` holds."""
    events: list[Event] = []
    give_up = time.monotonic() + timeout_s
    while not (events and until(events[-1])):
        assert time.monotonic() < give_up, f"job {job_id}: {[(e.type, e.data) for e in events]}"
        try:
            after = events[-1].id if events else "0"
            events += await queue.read_events(job_id, after=after, block_ms=500)
        except (ConnectionError, OSError, aioredis.ConnectionError):
            await asyncio.sleep(0.2)
    return events


async def final_events(queue: JobQueue, job_id: str, timeout_s: float = 180) -> list[Event]:
    return await follow(queue, job_id, lambda e: e.is_final, timeout_s)


def assert_one_final(events: list[Event], kind: str) -> None:
    finals = [e.type for e in events if e.is_final]
    assert finals == [kind], [(e.type, e.data) for e in events]


async def test_kill_9_mid_job_completes_on_a_later_attempt(
    make_pool: PoolFactory, queue: JobQueue, redis_server: Any
) -> None:
    pool = make_pool(redis_server.url)
    victim = job(pool.model, "long job", LONG)
    await queue.submit(victim)
    await follow(queue, victim.job_id, lambda e: e.type == "canvas")  # mid-job: one canvas of three done
    old_pid = pool.infos()[0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    events = await final_events(queue, victim.job_id)
    assert_one_final(events, "completed")
    started = [e.data["attempt"] for e in events if e.type == "started"]
    assert started == [1, 2]
    record = await queue.get(victim.job_id)
    assert record.state is JobState.SUCCEEDED and record.attempt == 2 and record.deliveries == 2
    assert len(record.result["token_ids"]) == 96  # type: ignore[index]
    assert pool.infos()[0]["pid"] != old_pid, "Ray restarted the replica in a fresh process"


async def test_a_job_that_crashes_its_replica_every_time_is_dead_lettered(
    make_pool: PoolFactory, queue: JobQueue, redis_server: Any
) -> None:
    pool = make_pool(redis_server.url)
    poison = job(pool.model, "@fault:crash")
    others = [job(pool.model, f"fine {i}") for i in range(2)]
    for spec in (poison, *others):
        await queue.submit(spec)
    events = await final_events(queue, poison.job_id, timeout_s=240)
    assert_one_final(events, "dead_lettered")
    assert [e.data["attempt"] for e in events if e.type == "started"] == [1, 2]
    record = await queue.get(poison.job_id)
    assert record.state is JobState.DEAD_LETTERED and record.deliveries == 2
    assert record.error is not None and record.error["code"] == "WORKER_LOST"
    dead = await queue.redis.xrange(Keys().dead_letter(pool.model))
    assert poison.job_id.encode() in [fields[b"job"] for _, fields in dead]
    for spec in others:
        assert_one_final(await final_events(queue, spec.job_id), "completed")


async def test_a_crash_after_the_result_is_written_but_before_the_ack_gives_one_result(
    make_pool: PoolFactory, queue: JobQueue, redis_server: Any
) -> None:
    pool = make_pool(redis_server.url)
    spec = job(pool.model, "@fault:exit-before-ack")
    await queue.submit(spec)
    await final_events(queue, spec.job_id)
    after = job(pool.model, "after the crash")
    await queue.submit(after)
    assert_one_final(await final_events(queue, after.job_id), "completed")
    stream = Keys().queue(pool.model)
    give_up = time.monotonic() + 60  # the restarted replica takes the orphan over once its lease lapses
    while (await queue.redis.xpending(stream, GROUP))["pending"]:
        assert time.monotonic() < give_up, "the written-but-unacknowledged entry was never settled"
        await asyncio.sleep(0.5)
    record = await queue.get(spec.job_id)
    assert record.state is JobState.SUCCEEDED and record.attempt == 1, "settled, not run again"
    events = await queue.read_events(spec.job_id)
    assert_one_final(events, "completed")
    assert [e.type for e in events].count("started") == 1
    assert await queue.redis.xlen(stream) == 0


async def test_jobs_accepted_before_redis_is_killed_and_restarted_all_complete(
    make_pool: PoolFactory, private_redis: Any
) -> None:
    pool = make_pool(private_redis.url)
    client = aioredis.Redis.from_url(private_redis.url)
    queue = JobQueue(client, **QUEUE_OPTIONS)
    try:
        specs = [job(pool.model, "before restart", LONG if i == 0 else FAST) for i in range(4)]
        for spec in specs:
            await queue.submit(spec)
        await follow(queue, specs[0].job_id, lambda e: e.type == "started")
        private_redis.kill(signal.SIGKILL)
        await asyncio.sleep(1.0)
        private_redis.start()
        for spec in specs:
            events = await final_events(queue, spec.job_id, timeout_s=240)
            assert_one_final(events, "completed")
            assert (await queue.get(spec.job_id)).state is JobState.SUCCEEDED
        assert await client.xlen(Keys().queue(pool.model)) == 0
    finally:
        await client.aclose()


async def test_the_pool_replaces_a_replica_that_is_dead_for_good(
    make_pool: PoolFactory, queue: JobQueue, redis_server: Any, ray_cluster: Any
) -> None:
    pool = make_pool(redis_server.url)
    [replica_id] = pool.replica_ids()
    ray_cluster.kill(pool.actor(replica_id), no_restart=True)
    give_up = time.monotonic() + 60
    while pool.check() == 0:  # Ray reports the death a moment after the kill
        assert time.monotonic() < give_up, "the pool never noticed the dead replica"
        await asyncio.sleep(0.5)
    assert pool.replaced == 1
    spec = job(pool.model, "after replacement")
    await queue.submit(spec)
    events = await final_events(queue, spec.job_id, timeout_s=240)
    assert_one_final(events, "completed")
    assert events[1].data["replica"] == replica_id
