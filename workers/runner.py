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

Client-side tool calls: a generation whose `JobSpec.tools` is set renders its messages with those tools
and stops at the first committed canvas that completes a tool call; the `completed` payload then has
`stop_reason` "tool_call" and `tool_calls: [{name, arguments}]` (always present, maybe empty, when tools
were sent). A `session_id` keeps the generation's `EngineSession` in a bounded LRU (`max_sessions`), so
the conversation's next job, whose prompt extends this one, prefills only its new tokens
(`usage.prefilled_tokens` says how many the encoder ran).

After the final write the job is counted in the process's Prometheus metrics (state; for a generation
also steps per canvas, tokens per second, time to first canvas) and its `replica.run` span gets the
final state, stop reason and token counts.

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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from blockpress.agents.errors import MalformedToolCall
from blockpress.agents.toolcalls import has_complete_call, parse_turn
from blockpress.runtime.contracts.jobs import EventType, JobState
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.queue.jobqueue import TRANSIENT_ERRORS, Claim, JobQueue
from blockpress.workers.errors import EngineBroken, GenerationCancelled, InvalidRequest
from blockpress.workers.types import CanvasEvent, CanvasStats, DraftEvent, EndEvent, GenerationResult, Timings

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
        max_sessions: engine sessions (KV caches) kept for `session_id`s, least recently used dropped
            first; each holds a conversation's cache in the engine's memory. 0 keeps none.
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
        max_sessions: int = 8,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.model = model
        self.replica_id = replica_id
        self.cancel_poll_s = cancel_poll_s
        self.draft_interval_s = draft_interval_s
        self.on_broken = on_broken
        self.agent_options = agent_options
        self.sessions = _SessionCache(max_sessions)
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
            with _replica_span(claim) as span:
                ending = await self._run_job(claim)
                _describe(span, ending)
        finally:
            self.current = None
            self.jobs_done += 1
        if ending.state is not None:
            _record_metrics(self.model, claim, ending)
        return ending.state

    async def _run_job(self, claim: Claim) -> _Ending:
        cancel = threading.Event()
        lost = asyncio.Event()
        done = asyncio.Event()
        watcher = asyncio.create_task(self._watch(claim, cancel, lost, done))
        try:
            ending = await self._execute(claim, cancel, lost)
        finally:
            # Stopped by an event, not Task.cancel(): redis-py may turn a cancellation that lands
            # mid-command into a ConnectionError, which the watcher rides out as transient, and
            # the watcher would then heartbeat a finished job forever.
            done.set()
            await watcher
        state, result, error = ending.state, ending.result, ending.error
        if state is not JobState.SUCCEEDED and claim.spec.session_id:
            # A generation that did not finish may have left its cache half-written: start over.
            self.sessions.drop(claim.spec.session_id)
        if state is None or lost.is_set():
            log.warning("job %s attempt %d lost its lease; a newer attempt owns it", claim.job_id, claim.attempt)
            return _NOT_OURS
        if _fault(claim, "@fault:exit-before-ack"):
            await _retry(lambda: self.queue.write_final(claim, state, result=result, error=error))
            os._exit(71)
        written = await _retry(lambda: self.queue.finish(claim, state, result=result, error=error))
        log.info("job %s attempt %d ended %s", claim.job_id, claim.attempt, state if written else "(stale)")
        return ending if written else _NOT_OURS

    async def _execute(self, claim: Claim, cancel: threading.Event, lost: asyncio.Event) -> _Ending:
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

    def _outcome(self, claim: Claim, outcome: Any, lost: asyncio.Event) -> _Ending:
        if isinstance(outcome, _Generation):
            return _Ending(JobState.SUCCEEDED, outcome.completed(claim), None, outcome.result)
        if isinstance(outcome, dict):  # an agent job's completed payload
            return _Ending(JobState.SUCCEEDED, outcome, None)
        if isinstance(outcome, GenerationCancelled) or _is_superseded(outcome):
            if lost.is_set() or _is_superseded(outcome):
                return _NOT_OURS
            return _Ending(JobState.CANCELLED, None, None)
        if isinstance(outcome, InvalidRequest):
            return _Ending(JobState.FAILED, None, {"code": "INVALID_ARGUMENT", "message": str(outcome)})
        if isinstance(outcome, _Unimplemented):
            return _Ending(JobState.FAILED, None, {"code": "UNIMPLEMENTED", "message": str(outcome)})
        if _is_broken(outcome):
            self.on_broken(outcome)
            return _NOT_OURS  # on_broken did not exit (tests): leave the job to its lease
        log.exception("job %s failed unexpectedly", claim.job_id, exc_info=outcome)
        message = f"{type(outcome).__name__}: {outcome}"
        return _Ending(JobState.FAILED, None, {"code": "INTERNAL", "message": message})

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
                post(self._generate(spec, cancel, post))
        except BaseException as exc:
            post(exc)
        finally:
            post(_DONE)

    def _generate(self, spec: Any, cancel: threading.Event, post: Callable[[Any], None]) -> _Generation:
        """One generation on the worker thread; with client tools, it ends at the first complete call."""
        settings = DenoiseSettings.from_mapping(spec.settings)
        if spec.messages:
            prompt_ids = list(self.engine.apply_chat_template(spec.messages, tools=spec.tools or None))
        else:
            prompt_ids = list(self.engine.encode(spec.prompt or ""))
        session = self.sessions.get(spec.session_id, self.engine.new_session) if spec.session_id else None
        cached = list(session.token_ids) if session is not None else []
        reused = len(cached) if cached and prompt_ids[: len(cached)] == cached else 0
        watch = _CallWatch(started=time.perf_counter()) if spec.tools else None
        events = self.engine.stream(prompt_ids, settings, cancel=cancel, session=session)
        try:
            for event in events:
                if isinstance(event, EndEvent):
                    return _Generation(event.result, tools=bool(spec.tools))
                post(event)
                if watch is not None and watch.add(event) and has_complete_call(self.engine.decode(watch.ids)):
                    # The turn is over for the client's framework: it runs the tool and sends the result
                    # in its next request, so any canvas after this one would be thrown away.
                    result = watch.result(self.engine.decode(watch.ids), len(prompt_ids), len(prompt_ids) - reused)
                    return _Generation(result, tools=True)
        finally:
            events.close()
        raise AssertionError("the engine's stream ended without a result")  # pragma: no cover

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


class _Ending(NamedTuple):
    """How a job ended: the final state to write (None: not ours to write), its payload, and the
    engine's result when it was a generation (for metrics)."""

    state: JobState | None
    result: dict[str, Any] | None
    error: dict[str, str] | None
    generation: GenerationResult | None = None


_NOT_OURS = _Ending(None, None, None)


class _SessionCache:
    """Engine sessions by `session_id`, least recently used dropped beyond `size`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._sessions: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, new: Callable[[], Any]) -> Any:
        session = self._sessions.pop(key, None)
        if session is None:
            session = new()
        if self.size > 0:
            self._sessions[key] = session
            while len(self._sessions) > self.size:
                dropped, _ = self._sessions.popitem(last=False)
                log.debug("session %s dropped (least recently used of %d)", dropped, self.size)
        return session

    def drop(self, key: str) -> None:
        self._sessions.pop(key, None)

    def keys(self) -> list[str]:
        """Session ids held, least recently used first."""
        return list(self._sessions)


@dataclass
class _CallWatch:
    """What a generation with client tools committed so far, to stop it at the first complete call."""

    started: float
    ids: list[int] = field(default_factory=list)
    canvases: list[CanvasStats] = field(default_factory=list)
    first_step_at: float | None = None
    first_canvas_s: float = 0.0

    def add(self, event: Any) -> bool:
        """Takes one stream event; True when it committed a canvas."""
        if isinstance(event, DraftEvent) and self.first_step_at is None:
            self.first_step_at = time.perf_counter() - event.step_s
        if not isinstance(event, CanvasEvent):
            return False
        self.ids += event.token_ids
        self.canvases.append(event.stats)
        if len(self.canvases) == 1:
            self.first_canvas_s = time.perf_counter() - self.started
        return True

    def result(self, text: str, prompt_tokens: int, prefilled: int) -> GenerationResult:
        """The result the engine would have returned had the call ended the turn.

        The seed is not known mid-stream and is not part of the payload; prefill time is the wait
        before the first denoising step.
        """
        prefill_s = (self.first_step_at - self.started) if self.first_step_at is not None else 0.0
        denoise_s = sum(sum(c.step_s) for c in self.canvases)
        timings = Timings(max(0.0, prefill_s), self.first_canvas_s, denoise_s, time.perf_counter() - self.started)
        return GenerationResult(list(self.ids), text, "stop_token", prompt_tokens, prefilled, self.canvases, timings, 0)


@dataclass(frozen=True)
class _Generation:
    """A finished generation and how its end reads to the client."""

    result: GenerationResult
    tools: bool = False
    """The job sent tool definitions: the payload carries `tool_calls`."""

    def completed(self, claim: Claim) -> dict[str, Any]:
        if not self.tools:
            return _completed(self.result, claim)
        text, calls, stop_reason = self.result.text, [], None
        try:
            text, call = parse_turn(self.result.text)
            if call is not None:
                calls.append({"name": call.name, "arguments": call.arguments})
                stop_reason = "tool_call"
        except MalformedToolCall as exc:
            # The model's mistake, not the caller's: the client framework gets the raw text and the
            # reason, and may retry or show it, as it would with any other model answer.
            log.info("job %s: malformed tool call: %s", claim.job_id, exc)
            stop_reason = "malformed_tool_call"
        payload = _completed(self.result, claim, stop_reason=stop_reason)
        payload["text"] = text
        payload["tool_calls"] = calls
        return payload


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


def _completed(result: GenerationResult, claim: Claim, *, stop_reason: str | None = None) -> dict[str, Any]:
    t = result.timings
    return {
        "text": result.text,
        "token_ids": list(result.token_ids),
        "stop_reason": stop_reason or result.stop_reason,
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


def _record_metrics(model: str, claim: Claim, ending: _Ending) -> None:
    """Counts the final state and, for a generation, its speed; metrics never fail a job."""
    try:
        from blockpress.runtime.metrics import get_metrics
    except ImportError:
        return
    assert ending.state is not None
    try:
        metrics = get_metrics()
        metrics.job_finished(model, ending.state.value)
        if ending.generation is not None:
            queued_s = max(0.0, claim.claimed_at - claim.spec.submitted_at)
            metrics.observe_generation(model, ending.generation, queued_s=queued_s)
    except Exception:
        log.exception("job %s: recording metrics failed", claim.job_id)


def _describe(span: Any, ending: _Ending) -> None:
    """The job's end on its `replica.run` span: final state, stop reason, token counts."""
    if span is None or ending.state is None:  # not ours: the newer attempt's span tells the end
        return
    from blockpress.runtime.tracing.telemetry import Attr

    span.set_attribute(Attr.JOB_STATE, ending.state.value)
    if ending.result is not None:
        usage = ending.result.get("usage") or {}
        span.set_attribute(Attr.GEN_AI_INPUT_TOKENS, int(usage.get("prompt_tokens", 0)))
        span.set_attribute(Attr.GEN_AI_OUTPUT_TOKENS, int(usage.get("completion_tokens", 0)))
        span.set_attribute(Attr.STOP_REASON, str(ending.result.get("stop_reason", "")))


@contextlib.contextmanager
def _replica_span(claim: Claim) -> Any:
    """`queue.wait` and `replica.run` spans when the telemetry module is there; yields the run span or None."""
    try:
        from opentelemetry import trace

        from blockpress.runtime import telemetry
    except ImportError:
        yield None
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
    ) as span:
        yield span
