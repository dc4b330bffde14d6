"""Autoscaling on the queue with real replicas (local Ray, the tiny model, the real queue)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.autoscale import QueueAutoscaler, ScalePolicy
from blockpress.workers.pool import ReplicaPool

pytestmark = pytest.mark.slow

QUEUE_OPTIONS = {"lease_s": 2.0, "max_deliveries": 3}
# A couple of seconds of denoising each on a CPU: a burst of them outlasts one replica long enough for
# the new ones to load their engines and take some.
BURST = {"max_new_tokens": 256, "max_denoising_steps": 24, "confidence_threshold": 0, "stop_token_ids": []}
LONG = {"max_new_tokens": 512, "max_denoising_steps": 32, "confidence_threshold": 0, "stop_token_ids": []}
POLICY = ScalePolicy(min_replicas=1, max_replicas=3, jobs_per_replica=2, max_wait_s=1.0, down_idle_s=2.0)


@pytest.fixture
def pool(ray_cluster: Any, redis_server: Any, tiny_checkpoint: Path) -> Iterator[ReplicaPool]:
    pool = ReplicaPool(
        str(tiny_checkpoint), 1, redis_url=redis_server.url, queue_options=QUEUE_OPTIONS, device="cpu",
        name_prefix=f"a{uuid.uuid4().hex[:6]}-", torch_threads=1,
    )  # fmt: skip
    pool.start(timeout_s=240)
    pool.watch(interval_s=0.5)
    yield pool
    pool.stop(drain_s=10)


@pytest.fixture
async def queue(redis_server: Any) -> AsyncIterator[JobQueue]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield JobQueue(client, **QUEUE_OPTIONS)
    await client.aclose()


async def _until(condition: Any, timeout_s: float, what: str) -> None:
    give_up = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < give_up, what
        await asyncio.sleep(0.25)


async def test_a_burst_scales_up_idleness_scales_down_and_no_job_is_lost(
    pool: ReplicaPool, queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="blockpress.workers.autoscale")
    scaler = QueueAutoscaler(queue, [pool], POLICY, interval_s=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(scaler.run(stop))
    sizes: list[int] = []
    try:
        jobs = [JobSpec(job_id=f"b{i}-{uuid.uuid4().hex[:6]}", model=pool.model, prompt=f"job {i}", settings=BURST)
                for i in range(12)]  # fmt: skip
        for job in jobs:
            await queue.submit(job)

        async def all_final() -> bool:
            sizes.append(pool.size)
            return all([(await queue.get(j.job_id)).state.is_final for j in jobs])

        await _until(all_final, 240, "the burst did not finish")
        records = [await queue.get(j.job_id) for j in jobs]
        assert [r.state for r in records] == [JobState.SUCCEEDED] * len(jobs), [(r.state, r.error) for r in records]
        # Each ran once: no replica that left the pool took a job down with it.
        assert [r.attempt for r in records] == [1] * len(jobs)
        assert max(sizes) == POLICY.max_replicas
        assert len({r.replica for r in records}) > 1  # the new replicas took work from the queue

        async def at_minimum() -> bool:
            return pool.size == POLICY.min_replicas and pool.draining == 0

        await _until(at_minimum, 60, f"pool did not shrink: {pool.size} + {pool.draining} draining")
    finally:
        stop.set()
        await task
    ups = [h for h in scaler.history if h[2] > h[1]]
    downs = [h for h in scaler.history if h[2] < h[1]]
    assert ups and all(reason in {"lag", "wait"} for *_, reason in ups)
    assert [h[2] for h in downs] == [2, 1] and all(reason == "idle" for *_, reason in downs)
    assert pool.drained == 2
    m = scaler.metrics
    assert m.decisions.labels(pool.model, "up")._value.get() == len(ups)
    assert m.decisions.labels(pool.model, "down")._value.get() == 2
    assert m.replicas.labels(pool.model)._value.get() == 1
    assert any("autoscale tiny: 1 ->" in r.getMessage() for r in caplog.records)
    assert any("-> 1 replicas (idle" in r.getMessage() for r in caplog.records)


async def test_a_replica_scaled_away_mid_job_finishes_it_first(pool: ReplicaPool, queue: JobQueue) -> None:
    job = JobSpec(job_id=f"long-{uuid.uuid4().hex[:6]}", model=pool.model, prompt="long", settings=LONG)
    await queue.submit(job)

    async def running() -> bool:
        return (await queue.get(job.job_id)).state is JobState.RUNNING

    await _until(running, 60, "the job never started")
    pool.scale_to(0)  # the only replica leaves while its job runs
    assert (pool.size, pool.draining) == (0, 1)

    async def done() -> bool:
        return (await queue.get(job.job_id)).state.is_final

    await _until(done, 120, "the draining replica did not finish its job")
    record = await queue.get(job.job_id)
    assert record.state is JobState.SUCCEEDED and record.attempt == 1
    assert len(record.result["token_ids"]) == LONG["max_new_tokens"]

    async def reaped() -> bool:
        return pool.draining == 0

    await _until(reaped, 30, "the drained replica was not ended")
    assert pool.drained == 1


async def test_the_replicas_command_runs_pools_with_the_autoscaler(
    ray_cluster: Any, redis_server: Any, queue: JobQueue, tiny_checkpoint: Path
) -> None:
    import socket
    import urllib.request

    from blockpress.runtime.cli.embedded import cluster_pools
    from blockpress.runtime.config import RuntimeSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = RuntimeSettings(
        redis_url=redis_server.url, replicas=1, min_replicas=1, max_replicas=2, scale_jobs_per_replica=1,
        scale_interval_s=0.5, scale_down_idle_s=1.0, pool_metrics_port=port, lease_s=2.0, drain_s=10,
    )  # fmt: skip
    options = {"device": "cpu", "torch_threads": 1, "name_prefix": f"c{uuid.uuid4().hex[:6]}-"}
    async with cluster_pools(settings, models=[str(tiny_checkpoint)], pool_options=options) as (pools, scaler):
        (pool,) = pools
        assert scaler is not None and scaler.policy.max_replicas == 2
        jobs = [JobSpec(job_id=f"c{i}-{uuid.uuid4().hex[:6]}", model=pool.model, prompt=f"job {i}", settings=BURST)
                for i in range(4)]  # fmt: skip
        for job in jobs:
            await queue.submit(job)

        async def grown_and_done() -> bool:
            return bool(scaler.history) and all([(await queue.get(j.job_id)).state.is_final for j in jobs])

        await _until(grown_and_done, 180, f"jobs or scale-up missing: {scaler.history}")
        assert all([(await queue.get(j.job_id)).state is JobState.SUCCEEDED for j in jobs])
        assert scaler.history[0][1:3] == (1, 2)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
                return str(response.read().decode())

        body = await asyncio.to_thread(scrape)
        assert f'blockpress_autoscale_decisions_total{{direction="up",model="{pool.model}"}} 1.0' in body
    assert pool.size == 0  # leaving the block drained and ended the pool
