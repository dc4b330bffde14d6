"""The replica's job loop on a `FakeEngine` (no torch) against real Redis: payloads, cancel, sessions and
the fault seam, which only a runner built with a `FaultInjector` consults."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.contracts.keys import GROUP, Keys
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.protocol import Engine
from blockpress.workers.runner import JobRunner
from blockpress.workers.testing import FakeEngine, PromptFaults
from blockpress.workers.traced import TracedEngine
from blockpress.workers.types import result_of


class _Exited(Exception):
    """What a test's fault injector raises instead of ending the test's process."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _exit(code: int) -> None:
    raise _Exited(code)


async def _claim(queue: JobQueue, spec: JobSpec) -> Any:
    await queue.submit(spec)
    claim = await queue.claim(spec.model, "r1", block_ms=1000)
    assert claim is not None and claim.job_id == spec.job_id
    return claim


def test_the_fake_engine_and_the_traced_engine_are_engines() -> None:
    engine: Engine = FakeEngine()
    traced: Engine = TracedEngine(engine)
    assert traced.decode(traced.encode("abc")) == "abc"
    assert result_of(traced.stream("hi")).text == "a fake answer"


async def test_a_generation_on_the_fake_engine_completes_with_its_payload(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    runner = JobRunner(FakeEngine(canvas_length=4), queue, model="fake", replica_id="r1")
    claim = await _claim(queue, JobSpec(job_id="g1", model="fake", prompt="hello"))
    assert await runner.run_job(claim) is JobState.SUCCEEDED
    record = await queue.get("g1")
    assert record.result is not None
    assert record.result["text"] == "a fake answer" and record.result["canvases"] == 4
    assert record.result["usage"] == {"prompt_tokens": 5, "completion_tokens": 13, "prefilled_tokens": 5}
    events = await queue.read_events("g1")
    assert [e.type for e in events].count("canvas") == 4 and events[-1].type == "completed"


async def test_a_session_id_reuses_the_conversations_prefix(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    runner = JobRunner(FakeEngine(), queue, model="fake", replica_id="r1")
    first = await _claim(queue, JobSpec(job_id="s1", model="fake", prompt="hi", session_id="chat"))
    await runner.run_job(first)
    spec = JobSpec(job_id="s2", model="fake", prompt="hia fake answer and more", session_id="chat")
    await runner.run_job(await _claim(queue, spec))
    result = (await queue.get("s2")).result
    assert result is not None and result["usage"]["prefilled_tokens"] == len(" and more")
    assert runner.sessions.keys() == ["chat"]


async def test_a_cancel_stops_the_fake_engine_between_steps(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    gate = threading.Event()
    runner = JobRunner(FakeEngine(step_gate=gate), queue, model="fake", replica_id="r1", cancel_poll_s=0.02)
    claim = await _claim(queue, JobSpec(job_id="c1", model="fake", prompt="hi"))
    job = asyncio.create_task(runner.run_job(claim))
    await queue.cancel("c1")
    await asyncio.sleep(0.2)  # the watcher sees the flag before the first step is let through
    gate.set()
    assert await asyncio.wait_for(job, 10) is JobState.CANCELLED


@pytest.mark.parametrize("prompt", ["@fault:crash", "@fault:crash-first", "@fault:exit-before-ack"])
async def test_without_a_fault_injector_a_fault_prompt_is_just_a_prompt(redis_client: Any, prompt: str) -> None:
    queue = JobQueue(redis_client)
    runner = JobRunner(FakeEngine(), queue, model="fake", replica_id="r1")
    claim = await _claim(queue, JobSpec(job_id="p1", model="fake", prompt=prompt))
    assert await runner.run_job(claim) is JobState.SUCCEEDED
    assert (await redis_client.xpending(Keys().queue("fake"), GROUP))["pending"] == 0


async def test_the_injector_crashes_a_marked_job_before_the_engine_runs(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    engine = FakeEngine()
    runner = JobRunner(engine, queue, model="fake", replica_id="r1", faults=PromptFaults(exit=_exit))
    claim = await _claim(queue, JobSpec(job_id="f1", model="fake", prompt="@fault:crash-first now"))
    # In a replica the exit ends the process; here it raises on the worker thread, so the job fails.
    assert await runner.run_job(claim) is JobState.FAILED
    assert engine.prompts == [], "the engine never ran"
    error = (await queue.get("f1")).error
    assert error is not None and error["code"] == "INTERNAL" and "72" in error["message"]


async def test_the_injector_writes_the_end_without_the_ack_then_exits(redis_client: Any) -> None:
    queue = JobQueue(redis_client)
    runner = JobRunner(FakeEngine(), queue, model="fake", replica_id="r1", faults=PromptFaults(exit=_exit))
    claim = await _claim(queue, JobSpec(job_id="a1", model="fake", prompt="@fault:exit-before-ack"))
    with pytest.raises(_Exited) as exited:
        await runner.run_job(claim)
    assert exited.value.code == 71
    assert (await queue.get("a1")).state is JobState.SUCCEEDED
    assert (await redis_client.xpending(Keys().queue("fake"), GROUP))["pending"] == 1, "written, not acknowledged"
