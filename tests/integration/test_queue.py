"""The job queue against a real redis-server: idempotency, bounds, leases, fencing, retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from blockpress.runtime.contracts.errors import JobFinished, JobIdConflict, JobNotFound, QueueFull
from blockpress.runtime.contracts.jobs import Event, JobSpec, JobState
from blockpress.runtime.contracts.keys import GROUP, Keys
from blockpress.runtime.queue.jobqueue import JobQueue

MODEL = "tiny"
KEYS = Keys()


def spec(job_id: str, **fields: Any) -> JobSpec:
    return JobSpec(job_id=job_id, model=MODEL, prompt=f"prompt of {job_id}", **fields)


async def types(queue: JobQueue, job_id: str) -> list[str]:
    return [e.type for e in await queue.read_events(job_id)]


async def test_submit_is_idempotent_on_the_job_id(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    first, created = await queue.submit(spec("a", settings={"seed": 1}))
    again, created_again = await queue.submit(spec("a", settings={"seed": 1}))  # a client's retry
    assert created and not created_again
    assert first.state is again.state is JobState.QUEUED
    assert again.spec.settings == {"seed": 1}, "the first submission's spec stands"
    with pytest.raises(JobIdConflict):  # the same id with another request is not the same job
        await queue.submit(spec("a", settings={"seed": 2}))
    assert await redis_client.xlen(KEYS.queue(MODEL)) == 1
    assert await types(queue, "a") == ["queued"]
    assert await queue.depth(MODEL) == 1


async def test_every_field_of_a_spec_survives_the_trip_through_redis(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    job = JobSpec(
        job_id="full",
        model=MODEL,
        kind="agent",
        messages=[{"role": "user", "content": "wie viel ist 2+2? ✓"}, {"role": "tool", "name": "calc", "content": "4"}],
        settings={"max_new_tokens": 64, "t_min": 0.25, "stop_token_ids": [1, 5]},
        drafts=True,
        deadline=time.time() + 3600.125,
        trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        session_id="s-1",
        tools=[{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}],
        agent={"task": "add", "max_turns": 4},
    )
    await queue.submit(job)
    assert (await queue.get("full")).spec == job
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None and claim.spec == job


async def test_a_full_queue_refuses_new_jobs_with_a_retry_hint_but_not_resubmits(redis_client: Any) -> None:
    queue = JobQueue(redis_client, max_queue_per_model=2, retry_after_s=0.5)
    await queue.submit(spec("a"))
    await queue.submit(spec("b"))
    with pytest.raises(QueueFull) as info:
        await queue.submit(spec("c"))
    assert info.value.retry_after_s == 0.5 and "2 queued jobs" in info.value.message
    _, created = await queue.submit(spec("a"))  # a client retrying an accepted job is not refused
    assert not created
    with pytest.raises(JobNotFound):
        await queue.get("c")
    claim = await queue.claim(MODEL, "r1", block_ms=100)  # one leaves the queue: room again
    assert claim is not None and await queue.depth(MODEL) == 1
    assert (await queue.submit(spec("c")))[1]


async def test_a_job_runs_once_and_leaves_the_stream(redis_client: Any) -> None:
    queue = JobQueue(redis_client, retention_s=600)
    await queue.submit(spec("a", submitted_at=time.time() - 30))
    assert 30 <= await queue.oldest_age(MODEL) < 90  # its age counts from submission, not from now
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None and claim.attempt == 1 and claim.spec.prompt == "prompt of a"
    assert (await queue.get("a")).state is JobState.RUNNING
    assert await queue.depth(MODEL) == 0 and await queue.oldest_age(MODEL) == 0
    assert await queue.append_event(claim, "canvas", {"index": 0, "text": "hi", "steps": 3, "tokens": 2})
    assert await queue.finish(claim, JobState.SUCCEEDED, result={"text": "hi"})
    record = await queue.get("a")
    assert record.state is JobState.SUCCEEDED and record.result == {"text": "hi"} and record.attempt == 1
    assert record.finished_at is not None and record.started_at is not None
    events = await queue.read_events("a")
    assert [e.type for e in events] == ["queued", "started", "canvas", "completed"]
    assert events[1].data == {"attempt": 1, "replica": "r1"}
    assert events[-1].data == {"text": "hi"} and events[-1].is_final
    assert await redis_client.xlen(KEYS.queue(MODEL)) == 0, "a final job's entry is deleted"
    assert (await redis_client.xpending(KEYS.queue(MODEL), GROUP))["pending"] == 0
    assert 0 < await redis_client.ttl(KEYS.job("a")) <= 600
    assert 0 < await redis_client.ttl(KEYS.events("a")) <= 600
    assert not await queue.finish(claim, JobState.FAILED, error={"code": "X", "message": "late"})
    assert await types(queue, "a") == ["queued", "started", "canvas", "completed"]


async def test_an_expired_lease_moves_the_job_and_fences_the_old_attempt(redis_client: Any) -> None:
    queue = JobQueue(redis_client, lease_s=0.3)
    await queue.submit(spec("a"))
    old = await queue.claim(MODEL, "r1", block_ms=100)
    assert old is not None
    assert await queue.claim(MODEL, "r2", block_ms=100) is None, "a live lease is not taken over"
    assert await queue.heartbeat(old)
    await asyncio.sleep(0.45)
    new = await queue.claim(MODEL, "r2", block_ms=100)
    assert new is not None and new.attempt == 2 and new.deliveries == 2
    assert new.previous_error is not None and new.previous_error["code"] == "WORKER_LOST"
    # The first replica comes back from a pause: nothing it writes lands.
    assert not await queue.heartbeat(old)
    assert await queue.append_event(old, "canvas", {"index": 0}) is None
    assert not await queue.finish(old, JobState.SUCCEEDED, result={"text": "stale"})
    assert await queue.finish(new, JobState.SUCCEEDED, result={"text": "fresh"})
    record = await queue.get("a")
    assert record.result == {"text": "fresh"} and record.attempt == 2 and record.replica == "r2"
    assert await types(queue, "a") == ["queued", "started", "started", "completed"]


async def test_heartbeats_keep_the_lease(redis_client: Any) -> None:
    queue = JobQueue(redis_client, lease_s=0.4)
    await queue.submit(spec("a"))
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None
    for _ in range(5):  # 0.75 s in all, almost twice the lease
        await asyncio.sleep(0.15)
        assert await queue.heartbeat(claim)
    assert await queue.claim(MODEL, "r2", block_ms=50) is None


async def test_a_crash_between_the_final_write_and_the_ack_still_gives_one_result(redis_client: Any) -> None:
    queue = JobQueue(redis_client, lease_s=0.3)
    await queue.submit(spec("a"))
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None
    assert await queue._write_final(claim, JobState.SUCCEEDED, result={"text": "once"}, ack=False)
    assert (await redis_client.xpending(KEYS.queue(MODEL), GROUP))["pending"] == 1
    await asyncio.sleep(0.45)
    assert await queue.claim(MODEL, "r2", block_ms=100) is None, "a final job is acknowledged, not rerun"
    assert (await redis_client.xpending(KEYS.queue(MODEL), GROUP))["pending"] == 0
    assert await redis_client.xlen(KEYS.queue(MODEL)) == 0
    record = await queue.get("a")
    assert record.state is JobState.SUCCEEDED and record.attempt == 1 and record.result == {"text": "once"}
    assert await types(queue, "a") == ["queued", "started", "completed"]


async def test_a_job_delivered_too_often_is_dead_lettered_and_others_still_run(redis_client: Any) -> None:
    queue = JobQueue(redis_client, lease_s=0.2, max_deliveries=2)
    await queue.submit(spec("poison"))
    for attempt in (1, 2):  # each delivery "crashes": nobody heartbeats or finishes
        claim = await queue.claim(MODEL, f"r{attempt}", block_ms=100)
        assert claim is not None and claim.attempt == attempt
        await asyncio.sleep(0.3)
    await queue.submit(spec("fine"))
    claim = await queue.claim(MODEL, "r3", block_ms=200)
    assert claim is not None and claim.job_id == "fine", "the poison job is settled, the next one runs"
    assert await queue.finish(claim, JobState.SUCCEEDED, result={"text": "ok"})
    record = await queue.get("poison")
    assert record.state is JobState.DEAD_LETTERED and record.deliveries == 2
    assert record.error is not None and record.error["code"] == "WORKER_LOST"
    assert "after 2 deliveries" in record.error["message"]
    events = await queue.read_events("poison")
    assert [e.type for e in events] == ["queued", "started", "started", "dead_lettered"]
    assert events[-1].data["deliveries"] == 2 and events[-1].data["error"]["code"] == "WORKER_LOST"
    dead = await redis_client.xrange(KEYS.dead_letter(MODEL))
    assert len(dead) == 1 and dead[0][1][b"job"] == b"poison"
    assert await redis_client.xlen(KEYS.queue(MODEL)) == 0


async def test_cancelling_a_queued_job_ends_it_at_once(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    await queue.submit(spec("a"))
    record = await queue.cancel("a")
    assert record.state is JobState.CANCELLED and record.cancel_requested
    assert await queue.depth(MODEL) == 0 and await redis_client.xlen(KEYS.queue(MODEL)) == 0
    assert await queue.claim(MODEL, "r1", block_ms=100) is None
    assert await types(queue, "a") == ["queued", "cancelled"]
    with pytest.raises(JobFinished) as info:
        await queue.cancel("a")
    assert info.value.state == "CANCELLED"
    with pytest.raises(JobNotFound):
        await queue.cancel("nope")


async def test_cancelling_a_running_job_flags_it_and_a_dead_replicas_job_ends_cancelled(
    redis_client: Any,
) -> None:
    queue = JobQueue(redis_client, lease_s=0.3)
    await queue.submit(spec("a"))
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None and not await queue.is_cancelled("a")
    record = await queue.cancel("a")
    assert record.state is JobState.RUNNING and await queue.is_cancelled("a")
    await asyncio.sleep(0.45)  # the replica died before it saw the flag
    assert await queue.claim(MODEL, "r2", block_ms=100) is None
    assert (await queue.get("a")).state is JobState.CANCELLED
    assert await types(queue, "a") == ["queued", "started", "cancelled"]


async def test_a_job_past_its_deadline_expires_without_starting(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    await queue.submit(spec("late", deadline=time.time() + 0.2))
    await queue.submit(spec("on-time", deadline=time.time() + 60))
    await asyncio.sleep(0.3)
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None and claim.job_id == "on-time"
    record = await queue.get("late")
    assert record.state is JobState.EXPIRED and record.attempt == 0 and record.started_at is None
    events = await queue.read_events("late")
    assert [e.type for e in events] == ["queued", "expired"]
    assert events[-1].data["deadline"] == pytest.approx(record.spec.deadline)


async def test_the_stream_keeps_exactly_the_unfinished_entries(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    for i in range(5):
        await queue.submit(spec(f"j{i}"))
    running = [await queue.claim(MODEL, "r1", block_ms=100) for _ in range(2)]
    assert all(running)
    assert await queue.finish(running[0], JobState.SUCCEEDED, result={})  # type: ignore[arg-type]
    entries = await redis_client.xrange(KEYS.queue(MODEL))
    assert sorted(f[b"job"].decode() for _, f in entries) == ["j1", "j2", "j3", "j4"]
    pending = await redis_client.xpending_range(KEYS.queue(MODEL), GROUP, "-", "+", 10)
    assert [p["message_id"] for p in pending] == [entries[0][0]], "the running job's entry is kept"


async def test_a_reader_blocked_on_events_wakes_up_for_the_next_one(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    await queue.submit(spec("a"))
    seen = await queue.read_events("a")
    reader = asyncio.create_task(queue.read_events("a", after=seen[-1].id, block_ms=5000))
    await asyncio.sleep(0.1)
    assert not reader.done()
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None
    events: list[Event] = await asyncio.wait_for(reader, 5)
    assert [e.type for e in events] == ["started"] and events[0].id > seen[-1].id
    assert await queue.read_events("a", after=events[0].id, block_ms=50) == []


async def test_the_deadline_sweep_expires_queued_jobs_with_no_replica_around(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    await queue.submit(spec("started", deadline=time.time() + 0.2))
    claim = await queue.claim(MODEL, "r1", block_ms=100)
    assert claim is not None and claim.job_id == "started"
    await queue.submit(spec("due", deadline=time.time() + 0.2))
    await queue.submit(spec("not-due", deadline=time.time() + 60))
    await queue.submit(spec("no-deadline"))
    assert await queue.expire_due(MODEL) == 0, "nothing is due yet"
    await asyncio.sleep(0.3)
    assert await queue.expire_due(MODEL) == 1
    assert (await queue.get("due")).state is JobState.EXPIRED
    assert await types(queue, "due") == ["queued", "expired"]
    assert (await queue.get("started")).state is JobState.RUNNING, "a started job is not expired"
    assert (await queue.get("not-due")).state is JobState.QUEUED
    assert await queue.depth(MODEL) == 2 and await queue.expire_due(MODEL) == 0
    taken = [await queue.claim(MODEL, "r2", block_ms=100) for _ in range(3)]
    assert [c.job_id if c else None for c in taken] == ["not-due", "no-deadline", None]
