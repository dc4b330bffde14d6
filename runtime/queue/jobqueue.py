"""The job queue: Redis Streams with one consumer group per model, at-least-once, fenced by attempt.

API (all async; `JobQueue(redis_client, *, max_queue_per_model, lease_s, max_deliveries,
retention_s, retry_after_s, keys)`):

    gateway   submit(spec) -> (JobRecord, created)     raises QueueFull(retry_after_s)
              get(job_id) -> JobRecord                  raises JobNotFound
              read_events(job_id, after="0", *, block_ms=None, count=None) -> list[Event]
              cancel(job_id) -> JobRecord               raises JobNotFound, JobFinished
              depth(model), oldest_age(model), live_replicas(model), expire_due(model)
    replica   claim(model, consumer, *, block_ms) -> Claim | None
              heartbeat(claim) -> bool, is_cancelled(job_id) -> bool
              append_event(claim, type, data) -> event id | None
              finish(claim, state, *, result=None, error=None) -> bool
              beat(model, replica)

How nothing is lost or done twice:
- `submit` writes the record, the `queued` event and the stream entry in one script, and is
  idempotent on the job id (a retried submit returns the first job, `created=False`); the record
  keeps a fingerprint of the request, so the id reused for another request is `JobIdConflict`.
- `claim` reads new entries with XREADGROUP and takes over entries whose lease expired with
  XAUTOCLAIM. The lease is the entry's idle time: `heartbeat` resets it (XCLAIM to itself), so a replica
  that stops heartbeating for `lease_s` loses the job to the next `claim`.
- Each start increments `attempt`; every later write of that run (`heartbeat`, `append_event`,
  `finish`) checks it, so a replica that lost its lease cannot write over the new attempt.
- `finish` writes the final state and event and retires the stream entry in one script. If a
  writer ever dies between the write and the ack, the next delivery sees a final
  job and only acknowledges it.
- A delivery that must not run is settled by `claim`: cancelled -> CANCELLED, past its deadline ->
  EXPIRED (never started), after `max_deliveries` deliveries -> DEAD_LETTERED with its last error and
  an entry in the model's dead-letter stream (the delivery limit is checked before the deadline, so a
  job that killed its replica every time is dead-lettered, not EXPIRED). `expire_due` expires queued
  jobs on time while no replica claims: every replica calls it between claims and, while busy, every
  0.25 s (workers/runner.py); a replica also stops a running job at its deadline (EXPIRED). With no
  replica alive at all, nothing sweeps until the gateway calls it too (not wired yet).
- Every script checks the types of the keys it writes before its first write (a foreign key of
  the wrong type refuses the call with BPKEYTYPE; a job whose own keys were clobbered is settled
  into the dead-letter stream instead of crash-looping replicas). Dead letters: `deadletters.py`.
- Retention: a final job's entry is acknowledged and deleted from the model stream at once, so the
  stream holds only queued and running work and is never trimmed; the record and events of a final
  job expire after `retention_s`.
- Durability is Redis's: run it with the append-only file on (`appendfsync always` loses nothing
  a submit acknowledged; `everysec` may lose the last second on a crash).

All scripts assume one Redis (or keys of one job and its model in one slot); key names: `keys.py`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from blockpress.runtime.contracts.errors import JobFinished, JobIdConflict, JobNotFound, QueueFull
from blockpress.runtime.contracts.jobs import FINAL_EVENT_TYPES, Event, JobRecord, JobSpec, JobState, dumps, loads
from blockpress.runtime.contracts.keys import GROUP, JobField, Keys
from blockpress.runtime.queue.batch import ScriptBatch
from blockpress.runtime.queue.claim import Claim
from blockpress.runtime.queue.scripts import NAMES, final_event_data, fingerprint, job_of, script
from blockpress.runtime.queue.scripts import text as _s

__all__ = ["LIVE_WINDOW_S", "TRANSIENT_ERRORS", "Claim", "JobQueue"]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a queue call raises while Redis is unreachable or restarting: retry, the data is safe."""
LIVE_WINDOW_S = 3.0
"""A replica counts as live while its last `beat` is younger than this: three of its ~1 s beats."""


class JobQueue:
    """Async job queue over one Redis connection pool.

    Args:
        redis_client: a `redis.asyncio.Redis`; the queue never closes it.
        max_queue_per_model: QUEUED jobs a model may hold; `submit` raises `QueueFull` past it.
        lease_s: seconds a running job stays with its replica without a heartbeat.
        max_deliveries: deliveries before a job is dead-lettered (a crash-looping job stops here).
        retention_s: seconds a final job's record and events are kept; 0 keeps them forever.
        retry_after_s: the retry hint `QueueFull` carries.
        keys: key names (another prefix shares one Redis between installs).
    """

    def __init__(
        self,
        redis_client: aioredis.Redis,
        *,
        max_queue_per_model: int = 1024,
        lease_s: float = 30.0,
        max_deliveries: int = 3,
        retention_s: int = 24 * 3600,
        retry_after_s: float = 1.0,
        keys: Keys | None = None,
    ) -> None:
        if lease_s <= 0 or max_deliveries < 1 or max_queue_per_model < 1:
            raise ValueError("lease_s must be > 0, max_deliveries and max_queue_per_model at least 1")
        self.redis = redis_client
        self.max_queue_per_model = max_queue_per_model
        self.lease_s = lease_s
        self.max_deliveries = max_deliveries
        self.retention_s = retention_s
        self.retry_after_s = retry_after_s
        self.keys = keys or Keys()
        self._scripts = {name: redis_client.register_script(script(name)) for name in NAMES}
        self._submits = ScriptBatch(redis_client, self._scripts["submit"])
        self._groups: set[str] = set()
        self._autoclaim_cursor: dict[str, str] = {}
        self._own_done: set[tuple[str, str]] = set()  # (model, consumer)s whose own pending entries were taken

    async def _run(self, name: str, job_id: str, model: str, *args: Any) -> Any:
        keys, argv = self._call(job_id, model, args)
        return await self._scripts[name](keys=keys, args=argv)

    def _call(self, job_id: str, model: str, args: tuple[Any, ...]) -> tuple[list[str], list[Any]]:
        """The keys and arguments every script takes (`scripts.py`), then `args`."""
        k = self.keys
        keys = [
            k.job(job_id), k.events(job_id), k.queue(model), k.queued(model), k.dead_letter(model), k.deadlines(model)
        ]  # fmt: skip
        return keys, [repr(time.time()), self.retention_s, GROUP, *args]

    # ---- gateway side -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> tuple[JobRecord, bool]:
        """Queues `spec` unless a job with its id exists; returns the job and whether it was created.

        Raises:
            QueueFull: the model already holds `max_queue_per_model` queued jobs.
            JobIdConflict: the id already names a job whose request differs from `spec`.
        """
        deadline = "" if spec.deadline is None else repr(float(spec.deadline))
        keys, argv = self._call(spec.job_id, spec.model, (
            spec.job_id, dumps(spec.to_dict()), spec.model, repr(float(spec.submitted_at)), deadline,
            self.max_queue_per_model, dumps({"model": spec.model}), fingerprint(spec),
        ))  # fmt: skip
        # Pipelined with the submits made while the previous pipeline was in flight (`batch.py`): a
        # burst of submits costs a round trip per batch, not per job.
        created, info = await self._submits.call(keys, argv)
        if created == -2:
            raise JobIdConflict(spec.job_id)
        if created == -1:
            raise QueueFull(self.retry_after_s, f"model {spec.model!r} has {_s(info)} queued jobs, the most it takes")
        if created == 1:
            return JobRecord(spec=spec, state=JobState.QUEUED, submitted_at=spec.submitted_at), True
        return await self.get(spec.job_id), False

    async def get(self, job_id: str) -> JobRecord:
        """The job's current record. Raises `JobNotFound` (unknown, or expired after retention)."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            raise JobNotFound(job_id)
        h = {_s(k): _s(v) for k, v in raw.items()}
        return JobRecord(
            spec=JobSpec.from_dict(loads(h[JobField.SPEC])),
            state=JobState(h[JobField.STATE]),
            attempt=int(h.get(JobField.ATTEMPT, 0)),
            deliveries=int(h.get(JobField.DELIVERIES, 0)),
            replica=h.get(JobField.REPLICA),
            result=loads(h.get(JobField.RESULT)),
            error=loads(h.get(JobField.ERROR)),
            cancel_requested=h.get(JobField.CANCEL) == "1",
            submitted_at=float(h.get(JobField.SUBMITTED_AT, 0.0)),
            started_at=float(h[JobField.STARTED_AT]) if JobField.STARTED_AT in h else None,
            finished_at=float(h[JobField.FINISHED_AT]) if JobField.FINISHED_AT in h else None,
        )

    async def read_events(
        self, job_id: str, after: str = "0", *, block_ms: int | None = None, count: int | None = None
    ) -> list[Event]:
        """Events after the event id `after` ("0": from the start), oldest first.

        With `block_ms`, waits up to that long for at least one event; an empty list means none came.
        A watcher resumes from the last id it saw, so a reconnecting client misses nothing.
        """
        reply: Any = await self.redis.xread({self.keys.events(job_id): after or "0"}, count=count, block=block_ms)
        events: list[Event] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                f = {_s(k): _s(v) for k, v in fields.items()}
                events.append(Event(_s(entry_id), f["type"], loads(f["data"]), float(f["ts"])))
        return events

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancels a job: a queued one ends CANCELLED now, a running one when its replica sees the flag.

        Raises:
            JobNotFound: no such job.
            JobFinished: the job already reached a final state.
        """
        model = await self.redis.hget(self.keys.job(job_id), JobField.MODEL)
        if model is None:
            raise JobNotFound(job_id)
        outcome, state = await self._run("cancel", job_id, _s(model), job_id)
        if _s(outcome) == "missing":
            raise JobNotFound(job_id)
        if _s(outcome) == "final":
            raise JobFinished(job_id, _s(state))
        return await self.get(job_id)

    async def expire_due(self, model: str, *, limit: int = 100) -> int:
        """Ends QUEUED jobs of `model` whose deadline has passed as EXPIRED; returns how many.

        `claim` also expires such jobs when it reaches them; this sweep makes them end on time when
        no replica is taking work. Replicas call it between jobs; a gateway may call it too.
        """
        due = await self.redis.zrangebyscore(self.keys.deadlines(model), "-inf", time.time(), start=0, num=limit)
        expired = 0
        for raw in due:
            job_id = _s(raw)
            expired += int(await self._run("expire", job_id, model, job_id))
        return expired

    async def depth(self, model: str) -> int:
        """Jobs of `model` that are QUEUED (not yet started)."""
        return int(await self.redis.zcard(self.keys.queued(model)))

    async def oldest_age(self, model: str) -> float:
        """Seconds the oldest QUEUED job of `model` has waited; 0 when none waits."""
        oldest = await self.redis.zrange(self.keys.queued(model), 0, 0, withscores=True)
        return max(0.0, time.time() - float(oldest[0][1])) if oldest else 0.0

    async def live_replicas(self, model: str, *, max_age_s: float | None = None) -> int:
        """Replicas of `model` whose last `beat` is younger than `max_age_s` (default `LIVE_WINDOW_S`:
        a replica beats about every second, idle or busy; a killed one stops counting within 3 s)."""
        horizon = time.time() - (LIVE_WINDOW_S if max_age_s is None else max_age_s)
        beats = await self.redis.hvals(self.keys.replicas(model))
        return sum(1 for beat in beats if float(beat) >= horizon)

    # ---- replica side -------------------------------------------------------------------------------

    async def ensure_group(self, model: str) -> None:
        """Creates the model's stream and consumer group if missing (replicas may start before jobs)."""
        if model in self._groups:
            return
        try:
            await self.redis.xgroup_create(self.keys.queue(model), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(model)

    async def claim(self, model: str, consumer: str, *, block_ms: int = 1000) -> Claim | None:
        """The next job `consumer` should run, waiting up to `block_ms` for one; None if none came.

        Jobs whose lease expired are taken over first. Deliveries that must not run (cancelled,
        past the deadline, past `max_deliveries`, already final) are settled here and skipped.
        """
        await self.ensure_group(model)
        give_up = time.monotonic() + block_ms / 1000
        while True:
            entry = await self._reclaim(model, consumer)
            reclaimed = entry is not None
            if entry is None:
                wait_ms = int((give_up - time.monotonic()) * 1000)
                entry = await self._read_new(model, consumer, max(wait_ms, 0) or None)
            if entry is None:
                return None
            claim = await self._start(model, consumer, entry, reclaimed)
            if claim is not None:
                return claim
            if time.monotonic() >= give_up:
                return None

    async def _reclaim(self, model: str, consumer: str) -> tuple[str, str] | None:
        if (model, consumer) not in self._own_done:
            # A replica restarted under its name takes back what it held at once, not after the lease.
            own = await self.redis.xpending_range(self.keys.queue(model), GROUP, "-", "+", 1, consumername=consumer)
            entries = await self.redis.xrange(self.keys.queue(model), own[0]["message_id"], count=1) if own else []
            if entries and entries[0][1]:
                return _s(entries[0][0]), job_of(entries[0][1])
            self._own_done.add((model, consumer))
        cursor = self._autoclaim_cursor.get(model, "0-0")
        try:
            reply = await self.redis.xautoclaim(
                self.keys.queue(model), GROUP, consumer, int(self.lease_s * 1000), start_id=cursor, count=1
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard(model)  # Redis lost the group (restart without persistence)
            await self.ensure_group(model)
            return None
        # XAUTOCLAIM scans a bounded slice of the pending list; the cursor walks the rest next time.
        self._autoclaim_cursor[model] = _s(reply[0])
        for entry_id, fields in reply[1]:
            if fields:
                return _s(entry_id), job_of(fields)
        return None

    async def _read_new(self, model: str, consumer: str, block_ms: int | None) -> tuple[str, str] | None:
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, {self.keys.queue(model): ">"}, count=1, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard(model)
            await self.ensure_group(model)
            return None
        streams: Any = reply or ()
        for _stream, entries in streams:
            for entry_id, fields in entries:
                return _s(entry_id), job_of(fields)
        return None

    async def _start(self, model: str, consumer: str, entry: tuple[str, str], reclaimed: bool) -> Claim | None:
        entry_id, job_id = entry
        reply = await self._run(
            "start", job_id, model, job_id, entry_id, consumer, self.max_deliveries, "1" if reclaimed else "0"
        )
        if _s(reply[0]) != "run":
            return None
        return Claim(
            spec=JobSpec.from_dict(loads(reply[3])),
            entry_id=entry_id,
            consumer=consumer,
            attempt=int(reply[1]),
            deliveries=int(reply[2]),
            previous_error=loads(reply[4]) if reply[4] else None,
            claimed_at=time.time(),
        )

    async def heartbeat(self, claim: Claim) -> bool:
        """Renews the lease; False when this attempt was superseded or the job is no longer running."""
        renewed = await self._run("heartbeat", claim.job_id, claim.model, claim.attempt, claim.consumer, claim.entry_id)
        return int(renewed) != 0

    async def is_cancelled(self, job_id: str) -> bool:
        """Whether a client asked to cancel the job."""
        return await self.redis.hget(self.keys.job(job_id), JobField.CANCEL) in (b"1", "1")

    async def append_event(self, claim: Claim, type: str, data: dict[str, Any]) -> str | None:
        """Appends an event for this attempt; returns its id, or None when the attempt is stale."""
        event_id = await self._run("append", claim.job_id, claim.model, claim.attempt, type, dumps(data))
        return _s(event_id) if event_id else None

    async def finish(
        self,
        claim: Claim,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        event_data: dict[str, Any] | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> bool:
        """Ends this attempt's job in `state` and acknowledges it; False when the attempt is stale.

        `result` is the `completed` payload (SUCCEEDED); `error` is `{code, message}` (FAILED). The final
        event's data defaults to what the state implies; `event_data` overrides it. `events` (type,
        data) are appended first, in the same script: a run's last canvas costs no round trip of its own.
        """
        return await self._write_final(
            claim, state, result=result, error=error, event_data=event_data, events=events, ack=True
        )

    async def _write_final(
        self,
        claim: Claim,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
        event_data: dict[str, Any] | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        ack: bool,
    ) -> bool:
        # Protected: only `finish` (ack=True) and fault tests (ack=False: the stream entry stays pending,
        # the crash window between the final write and the ack) call it.
        if not state.is_final:
            raise ValueError(f"finish needs a final state, got {state}")
        if event_data is None:
            event_data = final_event_data(state, claim, result, error)
        event_id = await self._run(
            "finish", claim.job_id, claim.model,
            claim.job_id, claim.attempt, state.value, FINAL_EVENT_TYPES[state], dumps(event_data),
            dumps(result) if result is not None else "", dumps(error) if error is not None else "",
            "1" if ack else "0", *[part for kind, data in events for part in (kind, dumps(data))],
        )  # fmt: skip
        return bool(event_id)

    async def beat(self, model: str, replica: str, *, alive: bool = True) -> None:
        """Records that `replica` of `model` is alive (or, with alive=False, that it stopped)."""
        key = self.keys.replicas(model)
        if alive:
            await self.redis.hset(key, replica, repr(time.time()))
        else:
            await self.redis.hdel(key, replica)
