"""Runs jobs from the queue on one engine: the loop inside every replica, free of Ray.

Per job: the queue's `claim` has already written `started` (attempt, replica). The engine streams in a
worker thread; committed canvases become `canvas` events, denoising steps become throttled `draft`
events when the job asked for them, and the end becomes one final write (`finish`). Beside the engine a
watcher renews the lease every `lease_s / 3` and polls the cancel flag every `cancel_poll_s`; either a
cancel or a lost lease sets the `threading.Event` the engine checks before every denoising step.

Outcomes: SUCCEEDED with the `completed` payload; FAILED (`INVALID_ARGUMENT`) for a request the engine
refuses; CANCELLED; nothing at all when the lease was lost (the newer attempt owns the job). An
`EngineBroken` (CUDA error, out of memory) calls `on_broken`, which by default ends the process so
that Ray starts a fresh replica; the job is redelivered once its lease expires.

Agent jobs (`kind == "agent"`) go to `blockpress.agents.run_agent_job(engine, spec, *, emit, cancel)`,
called in the worker thread; it returns the `completed` payload, calls `emit(type, data)` for its
events and raises `InvalidRequest` for bad input. Without it the job fails with UNIMPLEMENTED.

Fault injection for tests, active only when the replica's environment has `BLOCKPRESS_TEST_FAULTS=1`:
a generation whose prompt starts with `@fault:crash` ends the process on every attempt,
`@fault:crash-first` only on attempt 1, and `@fault:exit-before-ack` writes its result, then ends the
process before the stream entry is acknowledged.
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
from collections.abc import Callable
from typing import Any

from blockpress.runtime.jobs import EventType, JobState
from blockpress.runtime.queue import TRANSIENT_ERRORS, Claim, JobQueue

from .errors import EngineBroken, GenerationCancelled, InvalidRequest
from .settings import DenoiseSettings
from .types import CanvasEvent, DraftEvent, EndEvent, GenerationResult

__all__ = ["FAULTS_ENV", "JobRunner"]

log = logging.getLogger(__name__)

FAULTS_ENV = "BLOCKPRESS_TEST_FAULTS"
_DONE = object()


def _exit_process(exc: BaseException) -> None:
    log.critical("engine broken, exiting so the replica restarts: %s", exc)
    logging.shutdown()
    os._exit(70)


class JobRunner:
    """Pulls jobs of one model and runs them, one at a time, on one engine.

    Args:
        engine: a `DiffusionEngine` (or anything with its `stream`, `decode`, `apply_chat_template`).
        queue: the job queue.
        model: the model name whose queue this runner serves.
        replica_id: the consumer name; shows up in `started` events.
        cancel_poll_s: how often the cancel flag is read while a job runs.
        draft_interval_s: at most one `draft` event per this many seconds.
        on_broken: called when the engine cannot go on; the default ends the process.
        agent_options: extra keyword arguments of `run_agent_job` per claim (e.g. a `RedisLedger`
            for the claim's attempt, so that a redelivered agent job resumes).
    """

    def __init__(
        self,
        engine: Any,
        queue: JobQueue,
        *,
        model: str,
        replica_id: str,
        cancel_poll_s: float = 0.1,
        draft_interval_s: float = 0.25,
        on_broken: Callable[[BaseException], None] = _exit_process,
        agent_options: Callable[[Claim], dict[str, Any]] | None = None,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.model = model
        self.replica_id = replica_id
        self.cancel_poll_s = cancel_poll_s
        self.draft_interval_s = draft_interval_s
        self.on_broken = on_broken
        self.agent_options = agent_options
        self.jobs_done = 0
        self.current: str | None = None

    async def run(self, stop: asyncio.Event, *, block_ms: int = 1000) -> None:
        """Claims and runs jobs until `stop` is set; the job in hand is finished first (drain)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                await self.queue.beat(self.model, self.replica_id)
                await self.queue.expire_due(self.model)
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
            with _replica_span(claim):
                return await self._run_job(claim)
        finally:
            self.current = None
            self.jobs_done += 1

    async def _run_job(self, claim: Claim) -> JobState | None:
        cancel = threading.Event()
        lost = asyncio.Event()
        done = asyncio.Event()
        watcher = asyncio.create_task(self._watch(claim, cancel, lost, done))
        try:
            state, result, error = await self._execute(claim, cancel, lost)
        finally:
            # Stopped by an event, not Task.cancel(): redis-py may turn a cancellation that lands
            # mid-command into a ConnectionError, which the watcher rides out as transient, and
            # the watcher would then heartbeat a finished job forever.
            done.set()
            await watcher
        if state is None or lost.is_set():
            log.warning("job %s attempt %d lost its lease; a newer attempt owns it", claim.job_id, claim.attempt)
            return None
        if _fault(claim, "@fault:exit-before-ack"):
            await _retry(lambda: self.queue.write_final(claim, state, result=result, error=error))
            os._exit(71)
        written = await _retry(lambda: self.queue.finish(claim, state, result=result, error=error))
        log.info("job %s attempt %d ended %s", claim.job_id, claim.attempt, state if written else "(stale)")
        return state if written else None

    async def _execute(
        self, claim: Claim, cancel: threading.Event, lost: asyncio.Event
    ) -> tuple[JobState | None, dict[str, Any] | None, dict[str, str] | None]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def post(item: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        # The engine's spans must parent on `replica.run`, which lives in this task's context.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(self._work, claim, cancel, post),
            name=f"job-{claim.job_id}",
            daemon=True,
        )
        thread.start()
        last_draft = 0.0
        outcome: Any = None
        while (item := await events.get()) is not _DONE:
            if isinstance(item, DraftEvent):
                if not claim.spec.drafts or time.monotonic() - last_draft < self.draft_interval_s:
                    continue
                last_draft = time.monotonic()
                kind, data = (
                    EventType.DRAFT,
                    {
                        "canvas_index": item.canvas_index,
                        "step": item.step,
                        "text": self.engine.decode(item.token_ids),
                    },
                )
            elif isinstance(item, CanvasEvent):
                kind, data = (
                    EventType.CANVAS,
                    {
                        "index": item.canvas_index,
                        "text": item.text,
                        "steps": item.stats.steps,
                        "tokens": item.stats.tokens_committed,
                    },
                )
            elif isinstance(item, tuple):  # (type, data) from an agent job's emit
                kind, data = item
            else:
                outcome = item
                continue
            if lost.is_set():
                continue
            if await _retry(functools.partial(self.queue.append_event, claim, kind, data)) is None:
                lost.set()  # our attempt was superseded: stop the engine and write nothing more
                cancel.set()
        await asyncio.to_thread(thread.join)
        return self._outcome(claim, outcome, lost)

    def _outcome(
        self, claim: Claim, outcome: Any, lost: asyncio.Event
    ) -> tuple[JobState | None, dict[str, Any] | None, dict[str, str] | None]:
        if isinstance(outcome, GenerationResult):
            return JobState.SUCCEEDED, _completed(outcome, claim), None
        if isinstance(outcome, dict):  # an agent job's completed payload
            return JobState.SUCCEEDED, outcome, None
        if isinstance(outcome, GenerationCancelled) or _is_superseded(outcome):
            if lost.is_set() or _is_superseded(outcome):
                return None, None, None
            return JobState.CANCELLED, None, None
        if isinstance(outcome, InvalidRequest):
            return JobState.FAILED, None, {"code": "INVALID_ARGUMENT", "message": str(outcome)}
        if isinstance(outcome, _Unimplemented):
            return JobState.FAILED, None, {"code": "UNIMPLEMENTED", "message": str(outcome)}
        if _is_broken(outcome):
            self.on_broken(outcome)
            return None, None, None  # on_broken did not exit (tests): leave the job to its lease
        log.exception("job %s failed unexpectedly", claim.job_id, exc_info=outcome)
        message = f"{type(outcome).__name__}: {outcome}"
        return JobState.FAILED, None, {"code": "INTERNAL", "message": message}

    def _work(self, claim: Claim, cancel: threading.Event, post: Callable[[Any], None]) -> None:
        """The worker thread: runs the engine and posts its events, then the outcome, then _DONE."""
        spec = claim.spec
        try:
            if _fault(claim, "@fault:crash") or (_fault(claim, "@fault:crash-first") and claim.attempt == 1):
                os._exit(72)
            if spec.kind == "agent":
                options = self.agent_options(claim) if self.agent_options else {}
                post(_run_agent(self.engine, spec, cancel, post, options))
            else:
                settings = DenoiseSettings.from_mapping(spec.settings)
                if spec.messages:
                    prompt: Any = self.engine.apply_chat_template(spec.messages, tools=spec.tools or None)
                else:
                    prompt = spec.prompt or ""
                for event in self.engine.stream(prompt, settings, cancel=cancel):
                    post(event.result if isinstance(event, EndEvent) else event)
        except BaseException as exc:
            post(exc)
        finally:
            post(_DONE)

    async def _watch(self, claim: Claim, cancel: threading.Event, lost: asyncio.Event, done: asyncio.Event) -> None:
        """Renews the lease and watches the cancel flag until `done` is set."""
        every = max(self.queue.lease_s / 3, self.cancel_poll_s)
        next_beat = time.monotonic() + every
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.cancel_poll_s)
            if done.is_set():
                return
            try:
                if await self.queue.is_cancelled(claim.job_id):
                    cancel.set()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + every
                    await self.queue.beat(self.model, self.replica_id)  # health: alive while busy
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


class _Unimplemented(Exception):
    pass


def _run_agent(
    engine: Any, spec: Any, cancel: threading.Event, post: Callable[[Any], None], options: dict[str, Any]
) -> Any:
    try:
        from blockpress.agents import run_agent_job
    except ImportError:
        return _Unimplemented("agent jobs need blockpress.agents.run_agent_job, which this install lacks")
    return run_agent_job(engine, spec, emit=lambda kind, data: post((kind, data)), cancel=cancel, **options)


def _is_superseded(exc: Any) -> bool:
    """The agent layer found that a newer attempt owns the job (its ledger is fenced by attempt)."""
    try:
        from blockpress.agents.errors import Superseded
    except ImportError:
        return False
    return isinstance(exc, Superseded)


def _completed(result: GenerationResult, claim: Claim) -> dict[str, Any]:
    t = result.timings
    return {
        "text": result.text,
        "token_ids": list(result.token_ids),
        "stop_reason": result.stop_reason,
        "canvases": len(result.canvases),
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids),
            "prefilled_tokens": result.prefilled_tokens,
        },
        "timings": {
            "queue_s": max(0.0, claim.claimed_at - claim.spec.submitted_at),
            "prefill_s": t.prefill_s,
            "first_canvas_s": t.first_canvas_s,
            "denoise_s": t.denoise_s,
            "total_s": t.total_s,
        },
    }


def _is_broken(exc: Any) -> bool:
    if isinstance(exc, EngineBroken):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "CUDA" in str(exc))


def _fault(claim: Claim, marker: str) -> bool:
    prompt = claim.spec.prompt or ""
    return os.environ.get(FAULTS_ENV) == "1" and (prompt == marker or prompt.startswith(marker + " "))


async def _retry(write: Callable[[], Any]) -> Any:
    """Retries a queue write through a Redis outage: a finished job's result must not be dropped."""
    delay = 0.1
    while True:
        try:
            return await write()
        except TRANSIENT_ERRORS as exc:
            log.warning("queue write failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@contextlib.contextmanager
def _replica_span(claim: Claim) -> Any:
    """`queue.wait` and `replica.run` spans when the telemetry module is there; nothing otherwise."""
    try:
        from opentelemetry import trace

        from blockpress.runtime import telemetry
    except ImportError:
        yield
        return
    spec = claim.spec
    telemetry.record_queue_wait(
        job_id=spec.job_id,
        model=spec.model,
        submitted_at=spec.submitted_at,
        trace_context=spec.trace_context,
        attempt=claim.attempt,
        started_at=claim.claimed_at,
    )
    attributes = {
        telemetry.Attr.JOB_ID: spec.job_id,
        telemetry.Attr.JOB_KIND: spec.kind,
        telemetry.Attr.JOB_ATTEMPT: claim.attempt,
        telemetry.Attr.REPLICA: claim.consumer,
        telemetry.Attr.GEN_AI_REQUEST_MODEL: spec.model,
    }
    with telemetry.get_tracer().start_as_current_span(
        telemetry.SpanName.REPLICA_RUN,
        context=telemetry.extract_context(spec.trace_context),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield
