"""An agent job whose replica is killed (-9) after a tool call ran: redelivered, it resumes from the
ledger in Redis, and the tool never runs a second time.

Real parts: a Ray replica holding the engine on the tiny checkpoint and serving its Prometheus
metrics, a real redis-server, a tool that the replica loads from the `blockpress.tools` entry-point
group of a plugin installed for the test (a dist-info directory on the replica's PYTHONPATH), and a
kill -9 of the replica's process. The random checkpoint never calls a tool by itself, so the replica's
`agent_pin` policy pins the first turn to the call; the engine still generates it, and the agent loop
parses and runs it.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from blockpress.runtime.contracts.jobs import Event, JobSpec, JobState
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.pool import ReplicaPool

pytestmark = pytest.mark.slow

QUEUE_OPTIONS = {"lease_s": 2.0, "max_deliveries": 3}
# Fixed steps and no stop token: turn 2 (after the tool ran) takes long enough to kill the replica in it.
SETTINGS = {"max_new_tokens": 96, "max_denoising_steps": 40, "confidence_threshold": 0, "stop_token_ids": [],
            "seed": 1}  # fmt: skip

_PLUGIN = '''
import os

from blockpress.agents import tool


@tool
def journal(note: str) -> str:
    """Appends a note to the test's journal file, under the pid of the replica that ran it."""
    # The tool runs in a warm worker process that the replica started (blockpress.agents.toolworker),
    # so the replica is its parent.
    with open(os.environ["BP_TEST_JOURNAL"], "a") as f:
        f.write(f"{os.getppid()} {note}\\n")
    return "noted " + note


def pin(messages, tools):
    """The first turn is the call; later turns are the model's own."""
    if any(m.get("role") == "tool" for m in messages):
        return None
    return '<|tool_call>call:journal{note:<|"|>hello<|"|>}<tool_call|>'
'''


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """An installed-looking distribution with one `blockpress.tools` entry point."""
    root = tmp_path / "site"
    (root / "bp_test_tools-0.1.dist-info").mkdir(parents=True)
    (root / "bp_test_tools.py").write_text(textwrap.dedent(_PLUGIN))
    info = root / "bp_test_tools-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bp-test-tools\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[blockpress.tools]\njournal = bp_test_tools:journal\n")
    return root


@pytest.fixture
def pool(
    ray_cluster: Any, redis_server: Any, tiny_checkpoint: Path, plugin: Path, tmp_path: Path
) -> Iterator[ReplicaPool]:
    pool = ReplicaPool(
        str(tiny_checkpoint),
        1,
        redis_url=redis_server.url,
        queue_options=QUEUE_OPTIONS,
        device="cpu",
        env={"PYTHONPATH": str(plugin), "BP_TEST_JOURNAL": str(tmp_path / "journal.txt")},
        name_prefix=f"a{uuid.uuid4().hex[:6]}-",
        torch_threads=1,
        agent_pin="bp_test_tools:pin",
        metrics_port=0,
    )
    pool.start(timeout_s=240)
    yield pool
    pool.stop(drain_s=5)


@pytest.fixture
async def queue(redis_server: Any) -> AsyncIterator[JobQueue]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield JobQueue(client, **QUEUE_OPTIONS)
    await client.aclose()


async def follow(queue: JobQueue, job_id: str, until: str, events: list[Event], timeout_s: float = 180) -> None:
    give_up = time.monotonic() + timeout_s
    while not any(e.type == until for e in events):
        assert time.monotonic() < give_up, f"job {job_id}: {[(e.type, e.data) for e in events]}"
        events += await queue.read_events(job_id, after=events[-1].id if events else "0", block_ms=500)
        assert not (events and events[-1].is_final and until not in [e.type for e in events]), events[-1].data


async def test_kill_9_after_a_tool_call_resumes_and_the_tool_ran_once(
    pool: ReplicaPool, queue: JobQueue, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.txt"
    spec = JobSpec(
        job_id=f"agent-kill-{uuid.uuid4().hex[:6]}", model=pool.model, kind="agent", settings=SETTINGS,
        agent={"task": "Note hello in the journal.", "tools": ["journal"], "max_turns": 2},
    )  # fmt: skip
    await queue.submit(spec)
    events: list[Event] = []
    await follow(queue, spec.job_id, "tool_result", events)
    result = next(e for e in events if e.type == "tool_result").data
    assert result["name"] == "journal" and not result["is_error"], result
    old_pid = pool.infos()[0]["pid"]
    assert journal.read_text().split() == [str(old_pid), "hello"]
    os.kill(old_pid, signal.SIGKILL)  # in turn 2: the tool has run, the job has not ended

    await follow(queue, spec.job_id, "completed", events, timeout_s=240)
    assert [e.data["attempt"] for e in events if e.type == "started"] == [1, 2]
    assert sum(e.is_final for e in events) == 1
    assert journal.read_text().splitlines() == [f"{old_pid} hello"], "the tool ran exactly once"
    record = await queue.get(spec.job_id)
    assert record.state is JobState.SUCCEEDED and record.attempt == 2
    assert record.result is not None
    first_turn = record.result["turns"][0]
    assert first_turn["call"] == {"name": "journal", "arguments": {"note": "hello"}}, first_turn
    assert first_turn["result"] == {"result": "noted hello"}
    info = pool.infos()[0]
    assert info["pid"] != old_pid
    # The restarted replica serves its own metrics: the one job it finished.
    with urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10) as resp:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.read().decode())
            for s in family.samples
        }
    assert samples[("blockpress_jobs_total", (("model", pool.model), ("state", "SUCCEEDED")))] == 1.0
