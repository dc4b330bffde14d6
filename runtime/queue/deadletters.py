"""Dead letters: listing the jobs a model's queue gave up on, and replaying one as a new job.

A job is dead-lettered after `max_deliveries` deliveries that never finished (a job that kills its
replica every time), with its last error in the job record and an entry in `{bp}:dead:<model>`.
Its record stays final: a final state is written once. Replaying submits a copy of its spec under a
new job id, `<job_id>.replay-<n>` (the first n not taken), without the original deadline (it has
usually passed; an operator who replays wants the job to run), and removes the dead-letter entry so
the list shows only what is still to look at.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockpress.runtime.contracts.jobs import JobRecord, JobState, loads
from blockpress.runtime.queue.scripts import text

if TYPE_CHECKING:
    from blockpress.runtime.queue.jobqueue import JobQueue

__all__ = ["DeadLetter", "NotDeadLettered", "dead_letters", "replay"]


class NotDeadLettered(ValueError):
    """A replay was asked for a job that is not DEAD_LETTERED."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is {state}, not DEAD_LETTERED; only dead-lettered jobs are replayed")
        self.job_id = job_id
        self.state = state


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of a model's dead-letter stream."""

    entry_id: str
    job_id: str
    model: str
    error: dict[str, Any]
    deliveries: int
    at: float
    """Epoch seconds it was dead-lettered."""


async def dead_letters(queue: JobQueue, model: str, *, count: int = 100) -> list[DeadLetter]:
    """The newest `count` dead letters of `model`, newest first."""
    entries = await queue.redis.xrevrange(queue.keys.dead_letter(model), count=count)
    out = []
    for entry_id, raw in entries:
        f = {text(k): text(v) for k, v in raw.items()}
        out.append(
            DeadLetter(
                entry_id=text(entry_id),
                job_id=f.get("job", ""),
                model=f.get("model") or model,
                error=loads(f.get("error")) or {},
                deliveries=int(f.get("deliveries", 0)),
                at=float(f.get("ts", 0.0)),
            )
        )
    return out


async def replay(queue: JobQueue, job_id: str) -> JobRecord:
    """Queues a dead-lettered job again as a new job; returns the new job's record.

    Raises:
        JobNotFound: no such job (or its record expired after retention).
        NotDeadLettered: the job is in another state.
        QueueFull: the model's queue is full.
    """
    record = await queue.get(job_id)
    if record.state is not JobState.DEAD_LETTERED:
        raise NotDeadLettered(job_id, record.state.value)
    n = 1
    while await queue.redis.exists(queue.keys.job(f"{job_id}.replay-{n}")):
        n += 1
    spec = dataclasses.replace(record.spec, job_id=f"{job_id}.replay-{n}", deadline=None, submitted_at=time.time())
    new, _created = await queue.submit(spec)
    dead_key = queue.keys.dead_letter(record.spec.model)
    for entry in await dead_letters(queue, record.spec.model, count=10_000):
        if entry.job_id == job_id:
            await queue.redis.xdel(dead_key, entry.entry_id)
    return new
