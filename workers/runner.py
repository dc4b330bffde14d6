"""`JobRunner`: claims jobs of one model and runs them on one engine; the loop inside every replica.

Per job: the queue's `claim` has already written `started` (attempt, replica). The job runs in a worker
thread (a generation in `generation.run_generation`, an agent task in `agent_job.run_agent_job`);
committed canvases become `canvas` events, denoising steps become throttled `draft` events when the job
asked for them, and the end becomes one final write (`finish`). Beside it a watcher renews the lease
every `lease_s / 3` and polls the cancel flag every `cancel_poll_s`; either a cancel or a lost lease
sets the `threading.Event` the engine checks before every denoising step.

Outcomes: SUCCEEDED with the `completed` payload; FAILED (`INVALID_ARGUMENT`) for a request the engine
refuses; CANCELLED; EXPIRED when the job's deadline passes while it runs (the watcher stops it like a
cancel); nothing at all when the lease was lost (the newer attempt owns the job). An
`EngineBroken` (CUDA error, out of memory) calls `on_broken`, which by default ends the process so
that Ray starts a fresh replica; the job is redelivered once its lease expires.

After the final write the job is counted in the process's Prometheus metrics and its `replica.run`
span gets the final state, stop reason and token counts (`instrument`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from blockpress.agents.errors import Superseded
from blockpress.runtime.contracts.events import PAYLOAD_TYPES, Canvas, Completed, Draft, to_data
from blockpress.runtime.contracts.jobs import JobState
from blockpress.runtime.queue.jobqueue import TRANSIENT_ERRORS, Claim, JobQueue
from blockpress.workers.agent_job import run_agent_job
from blockpress.workers.errors import GenerationCancelled, error_code
from blockpress.workers.faults import FaultInjector
from blockpress.workers.generation import Generation, run_generation
from blockpress.workers.instrument import describe, record_metrics, replica_span
from blockpress.workers.outcome import NOT_OURS, Ending, is_broken
from blockpress.workers.protocol import Engine
from blockpress.workers.sessions import SessionCache
from blockpress.workers.types import CanvasEvent, DraftEvent

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

_DONE = object()
_SWEEP_S = 0.25
"""How often a busy replica expires queued jobs past their deadline."""
_T = TypeVar("_T")


def _exit_process(exc: BaseException) -> None:
    log.critical("engine broken, exiting so the replica restarts: %s", exc)
    logging.shutdown()
    os._exit(70)


class JobRunner:
    """Pulls jobs of one model and runs them, one at a time, on one engine.

    Args:
        engine: the replica's engine (a `DiffusionEngine`, usually inside a `TracedEngine`).
        queue: the job queue.
        model: the model name whose queue this runner serves.
        replica_id: the consumer name; shows up in `started` events.
        cancel_poll_s: how often the cancel flag is read while a job runs.
        draft_interval_s: at most one `draft` event per this many seconds.
        on_broken: called when the engine cannot go on; the default ends the process.
        agent_options: extra keyword arguments of `run_agent_job` per claim (e.g. a `RedisLedger`
            for the claim's attempt, so that a redelivered agent job resumes).
        max_sessions: engine sessions (KV caches) kept for `session_id`s, least recently used dropped
            first; each holds a conversation's cache in the engine's memory. 0 keeps none.
        faults: fault hooks a test installs; None (production) makes no fault checks at all.
    """

    def __init__(
        self,
        engine: Engine,
        queue: JobQueue,
        *,
        model: str,
        replica_id: str,
        cancel_poll_s: float = 0.1,
        draft_interval_s: float = 0.25,
        on_broken: Callable[[BaseException], None] = _exit_process,
        agent_options: Callable[[Claim], dict[str, Any]] | None = None,
        max_sessions: int = 8,
        faults: FaultInjector | None = None,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.model = model
        self.replica_id = replica_id
        self.cancel_poll_s = cancel_poll_s
        self.draft_interval_s = draft_interval_s
        self.on_broken = on_broken
        self.agent_options = agent_options
        self.sessions = SessionCache(max_sessions)
        self.faults = faults
        self.jobs_done = 0
        self.current: str | None = None
        self._thread = _JobThread()
        self._watchers: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, *, block_ms: int = 1000) -> None:
        """Claims and runs jobs until `stop` is set; the job in hand is finished first (drain)."""
        backoff = 0.1
        chores_due = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= chores_due:
                    # The liveness beat and the deadline sweep, at most every _SWEEP_S rather than
                    # before every claim: back-to-back short jobs paid two round trips each for them.
                    await self.queue.beat(self.model, self.replica_id)
                    await self.queue.expire_due(self.model)
                    chores_due = time.monotonic() + _SWEEP_S
                claim = await self.queue.claim(self.model, self.replica_id, block_ms=block_ms)
                backoff = 0.1
            except TRANSIENT_ERRORS as exc:
                log.warning("queue unreachable (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if claim is None:
                continue
            try:
                await self.run_job(claim)
            except Exception:
                # A bug must not stop the replica: the job's lease lapses and it is delivered again,
                # up to max_deliveries, while this replica goes on with the next one.
                log.exception("job %s: runner error; leaving the job to its lease", claim.job_id)
        with contextlib.suppress(Exception):
            await self.queue.beat(self.model, self.replica_id, alive=False)

    async def run_job(self, claim: Claim) -> JobState | None:
        """Runs one claimed job to its end; returns the final state written, None if it was not ours."""
        self.current = claim.job_id
        log.info("job %s attempt %d started on %s", claim.job_id, claim.attempt, self.replica_id)
        try:
            with replica_span(claim) as span:
                ending = await self._run_job(claim)
                describe(span, ending)
        finally:
            self.current = None
            self.jobs_done += 1
        record_metrics(self.model, claim, ending)
        return ending.state

    async def _run_job(self, claim: Claim) -> Ending:
        cancel = threading.Event()
        lost = asyncio.Event()
        done = asyncio.Event()
        expired = asyncio.Event()
        watcher = asyncio.create_task(self._watch(claim, cancel, lost, done, expired))
        try:
            ending = await self._execute(claim, cancel, lost)
            if expired.is_set() and ending.state is JobState.CANCELLED:
                # Stopped by its deadline, not by the client: EXPIRED, as a queued job past it.
                ending = Ending(JobState.EXPIRED, None, None)
        except BaseException:
            done.set()
            await watcher
            raise
        # Stopped by an event, not Task.cancel(): redis-py may turn a cancellation that lands
        # mid-command into a ConnectionError, which the watcher rides out as transient, and the
        # watcher would then heartbeat a finished job forever. Not awaited: the final write need not
        # wait for its last wake-up, since the attempt fences the write either way; it is held until
        # it has ended (the loop keeps only a weak reference to a task).
        done.set()
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return await self._end(claim, ending, lost)

    async def _end(self, claim: Claim, ending: Ending, lost: asyncio.Event) -> Ending:
        """Writes how the job ended (with its last events), unless a newer attempt owns it."""
        if ending.state is not JobState.SUCCEEDED and claim.spec.session_id:
            # A generation that did not finish may have left its cache half-written: start over.
            self.sessions.drop(claim.spec.session_id)
        if ending.state is None or lost.is_set():
            log.warning("job %s attempt %d lost its lease; a newer attempt owns it", claim.job_id, claim.attempt)
            return NOT_OURS
        state, result, error, last = ending.state, ending.result, ending.error, ending.events
        if self.faults is not None:
            await self.faults.before_finish(claim, self.queue, ending)
        written = await _retry(lambda: self.queue.finish(claim, state, result=result, error=error, events=last))
        log.info("job %s attempt %d ended %s", claim.job_id, claim.attempt, state if written else "(stale)")
        return ending if written else NOT_OURS

    async def _execute(self, claim: Claim, cancel: threading.Event, lost: asyncio.Event) -> Ending:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def post(item: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        # The engine's spans must parent on `replica.run`, which lives in this task's context.
        context = contextvars.copy_context()
        self._thread.run(context.run, self._work, claim, cancel, post)
        outcome: Any = None
        held: list[tuple[str, dict[str, Any]]] = []  # the last canvas: written with the final event
        while (item := await events.get()) is not _DONE:
            if isinstance(item, DraftEvent):
                text = self.engine.decode(item.token_ids)
                kind, data = to_data(Draft(canvas_index=item.canvas_index, step=item.step, text=text))
            elif isinstance(item, CanvasEvent):
                canvas = Canvas(
                    index=item.canvas_index, text=item.text, steps=item.stats.steps, tokens=item.stats.tokens_committed
                )
                kind, data = to_data(canvas)
                if item.last:
                    held.append((kind, data))
                    continue
            elif isinstance(item, PAYLOAD_TYPES) and not isinstance(item, Completed):  # an agent job's emit
                kind, data = to_data(item)
            else:
                outcome = item
                continue
            if lost.is_set():
                continue
            if await _retry(functools.partial(self.queue.append_event, claim, kind, data)) is None:
                lost.set()  # our attempt was superseded: stop the engine and write nothing more
                cancel.set()
        ending = self._outcome(claim, outcome, lost)
        return ending if ending.state is None else ending._replace(events=tuple(held))

    def _outcome(self, claim: Claim, outcome: Any, lost: asyncio.Event) -> Ending:
        if isinstance(outcome, Generation):
            return Ending(JobState.SUCCEEDED, to_data(outcome.completed(claim))[1], None, outcome.result)
        if isinstance(outcome, Completed):  # an agent job's
            return Ending(JobState.SUCCEEDED, to_data(outcome)[1], None)
        if isinstance(outcome, Superseded):  # the agent's ledger found a newer attempt
            return NOT_OURS
        if isinstance(outcome, GenerationCancelled):
            return NOT_OURS if lost.is_set() else Ending(JobState.CANCELLED, None, None)
        if is_broken(outcome):
            self.on_broken(outcome)
            return NOT_OURS  # on_broken did not exit (tests): leave the job to its lease
        code = error_code(outcome)
        if code != "INTERNAL":  # the caller's or the operator's to fix: the message says what
            return Ending(JobState.FAILED, None, {"code": code, "message": str(outcome)})
        log.exception("job %s failed unexpectedly", claim.job_id, exc_info=outcome)
        message = f"{type(outcome).__name__}: {outcome}"
        return Ending(JobState.FAILED, None, {"code": "INTERNAL", "message": message})

    def _work(self, claim: Claim, cancel: threading.Event, post: Callable[[Any], None]) -> None:
        """The worker thread: runs the job and posts its events, then the outcome, then _DONE."""
        spec = claim.spec
        post_event = self._draft_filter(claim, post)
        try:
            if self.faults is not None:
                self.faults.job_started(claim)
            if spec.kind == "agent":
                options = self.agent_options(claim) if self.agent_options else {}
                post(run_agent_job(self.engine, spec, emit=post, cancel=cancel, **options))
            else:
                post(run_generation(self.engine, spec, self.sessions, cancel, post_event))
        except BaseException as exc:
            post(exc)
        finally:
            post(_DONE)

    def _draft_filter(self, claim: Claim, post: Callable[[Any], None]) -> Callable[[Any], None]:
        """`post` without the drafts the job will not send, decided on the engine's thread: every step
        makes a draft, and waking the event loop for one that is dropped costs the step time."""
        last = -self.draft_interval_s
        wanted = claim.spec.drafts

        def post_event(item: Any) -> None:
            nonlocal last
            if isinstance(item, DraftEvent):
                if not wanted or time.monotonic() - last < self.draft_interval_s:
                    return
                last = time.monotonic()
            post(item)

        return post_event

    async def _watch(
        self, claim: Claim, cancel: threading.Event, lost: asyncio.Event, done: asyncio.Event, expired: asyncio.Event
    ) -> None:
        """Renews the lease, watches the cancel flag and the job's deadline until `done` is set.

        While busy it also sweeps the model's queued jobs past their deadline (`expire_due`), so
        they end on time although no replica is claiming.
        """
        every = max(self.queue.lease_s / 3, self.cancel_poll_s)
        next_beat = time.monotonic() + every
        next_sweep = time.monotonic()
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cancel_poll_s):  # no task per wait, as wait_for makes
                    await done.wait()
            if done.is_set():
                return
            deadline = claim.spec.deadline
            if deadline is not None and time.time() > deadline and not cancel.is_set():
                expired.set()
                cancel.set()
            try:
                if await self.queue.is_cancelled(claim.job_id):
                    cancel.set()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + _SWEEP_S
                    await self.queue.expire_due(self.model)
                    # Health: alive while busy, as often as idle, so a gateway's short liveness window holds.
                    await self.queue.beat(self.model, self.replica_id)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + every
                    if not await self.queue.heartbeat(claim):
                        lost.set()
                        cancel.set()
                        return
            except TRANSIENT_ERRORS as exc:
                # Redis is away: keep running; the lease is lost only if it stays away past lease_s.
                log.warning("job %s: heartbeat failed (%s)", claim.job_id, exc)
            except Exception:
                # Not transient, so a bug; the watcher keeps going, since without it the lease lapses.
                log.exception("job %s: heartbeat error", claim.job_id)


class _JobThread:
    """The one long-lived thread a runner's jobs run on, one after another.

    A fresh thread per job cost ~0.4 ms before the engine's first instruction on the development
    machine: the start itself, and the thread-local state of the tokenizer and torch built again.
    Restarted if it ever ends (a job's code raising past `_work`'s catch-all).
    """

    def __init__(self) -> None:
        self._inbox: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="replica-jobs", daemon=True)
            self._thread.start()
        self._inbox.put((fn, args))

    def _serve(self) -> None:
        while True:
            fn, args = self._inbox.get()
            fn(*args)


async def _retry(write: Callable[[], Awaitable[_T]]) -> _T:
    """Retries a queue write through a Redis outage: a finished job's result must not be dropped."""
    delay = 0.1
    while True:
        try:
            return await write()
        except TRANSIENT_ERRORS as exc:
            log.warning("queue write failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
