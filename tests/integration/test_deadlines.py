"""Deadlines hold while a job runs and while it waits behind busy replicas (issue 17, item 8).

A real redis-server and the replica's real job loop on a `FakeEngine` held mid-generation.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.runner import JobRunner
from blockpress.workers.testing import FakeEngine


class _Slow:
    """A step gate that only slows each step: the job would run for minutes, yet it checks cancel."""

    def wait(self) -> None:
        time.sleep(0.02)


async def test_a_running_job_past_its_deadline_ends_expired_and_a_queued_one_expires_on_time(
    redis_client: Any,
) -> None:
    queue = JobQueue(redis_client)
    runner = JobRunner(FakeEngine("x" * 4000, steps=50, step_gate=_Slow()), queue, model="fake", replica_id="r1")  # type: ignore[arg-type]
    now = time.time()
    running = JobSpec(job_id="running", model="fake", prompt="x", deadline=now + 0.6)
    waiting = JobSpec(job_id="waiting", model="fake", prompt="y", deadline=now + 0.5)
    await queue.submit(running)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, block_ms=200))
    while (await queue.get("running")).state is not JobState.RUNNING:
        await asyncio.sleep(0.02)
    await queue.submit(waiting)  # behind the busy (only) replica
    while not (await queue.get("waiting")).state.is_final:
        await asyncio.sleep(0.02)
    waited = time.time() - now
    record = await queue.get("waiting")
    assert record.state is JobState.EXPIRED and waited < 1.0, f"expired at {waited:.2f} s"
    while not (await queue.get("running")).state.is_final:
        assert time.time() - now < 5, "the running job ran on past its deadline"
        await asyncio.sleep(0.02)
    ran = time.time() - now
    assert (await queue.get("running")).state is JobState.EXPIRED and ran < 1.5, ran
    assert [e.type for e in await queue.read_events("running") if e.is_final] == ["expired"]
    stop.set()
    await task
