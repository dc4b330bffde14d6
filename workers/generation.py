"""One generation job on the engine: its prompt, its session, the client-tool stop and its payload.

Runs on the job's worker thread. Committed canvases and drafts go to `post` as the engine streams them;
the runner turns them into job events. A job whose `JobSpec.tools` is set renders its messages with
those tools and stops at the first committed canvas that completes a tool call: the client's framework
runs the tool and sends the result in its next request, so any later canvas would be thrown away. Its
`completed` payload then has `stop_reason` "tool_call" and `tool_calls: [{name, arguments}]` (always
present, maybe empty, when tools were sent). A `session_id` keeps the generation's session in the
runner's `SessionCache`, so the conversation's next job prefills only its new tokens
(`usage.prefilled_tokens` says how many the encoder ran). Messages with images are rendered by
`images.render`, and their pixel values reach the encoder through the session (`workers/images.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockpress.agents.errors import MalformedToolCall
from blockpress.agents.toolcalls import has_complete_call, parse_turn
from blockpress.runtime.contracts.events import Completed, ToolCall, Usage
from blockpress.runtime.contracts.events import Timings as PayloadTimings
from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.queue.jobqueue import Claim
from blockpress.workers import images
from blockpress.workers.protocol import Engine
from blockpress.workers.sessions import SessionCache
from blockpress.workers.types import CanvasEvent, CanvasStats, DraftEvent, GenerationResult, Timings, result_of

__all__ = ["Generation", "completed_payload", "run_generation"]

log = logging.getLogger(__name__)


def run_generation(
    engine: Engine,
    spec: JobSpec,
    sessions: SessionCache,
    cancel: threading.Event,
    post: Callable[[DraftEvent | CanvasEvent], None],
) -> Generation:
    """Runs the generation `spec` asks for; with client tools, it ends at the first complete call.

    Raises:
        InvalidRequest: the engine refused the request (a prompt that does not fit, no chat template).
        GenerationCancelled: `cancel` was set.
        EngineBroken: the engine cannot go on.
    """
    settings = DenoiseSettings.from_mapping(spec.settings)
    vision = None
    if images.has_images(spec.messages):
        prompt_ids, vision = images.render(engine, list(spec.messages or ()), spec.tools or None)
    elif spec.messages:
        prompt_ids = list(engine.apply_chat_template(list(spec.messages), tools=spec.tools or None))
    else:
        prompt_ids = list(engine.encode(spec.prompt or ""))
    session = sessions.get(spec.session_id, engine.new_session) if spec.session_id else None
    if vision is not None and session is None:
        session = engine.new_session()  # the images ride on the session into the prefill
    if session is not None and hasattr(session, "attach_images"):
        session.attach_images(vision)  # always: a session's previous prompt may have had images
    cached = list(session.token_ids) if session is not None else []
    reused = len(cached) if cached and prompt_ids[: len(cached)] == cached else 0
    watch = _CallWatch(started=time.perf_counter()) if spec.tools else None

    def on_event(event: DraftEvent | CanvasEvent) -> GenerationResult | None:
        post(event)
        if watch is None or not watch.add(event):
            return None
        text = engine.decode(watch.ids)
        if not has_complete_call(text):
            return None
        return watch.result(text, len(prompt_ids), len(prompt_ids) - reused)

    events = engine.stream(prompt_ids, settings, cancel=cancel, session=session)
    try:
        return Generation(result_of(events, on_event), tools=bool(spec.tools))
    finally:
        if vision is not None and session is not None and hasattr(session, "attach_images"):
            # The pixels are encoded by now; an agent turn on the same session must not see them again.
            session.attach_images(None)


@dataclass(frozen=True)
class Generation:
    """A finished generation and how its end reads to the client."""

    result: GenerationResult
    tools: bool = False
    """The job sent tool definitions: the payload carries `tool_calls`."""

    def completed(self, claim: Claim) -> Completed:
        """The job's `completed` payload."""
        if not self.tools:
            return completed_payload(self.result, claim)
        text, calls, stop_reason = self.result.text, [], None
        try:
            text, call = parse_turn(self.result.text)
            if call is not None:
                calls.append(ToolCall(name=call.name, arguments=call.arguments))
                stop_reason = "tool_call"
        except MalformedToolCall as exc:
            # The model's mistake, not the caller's: the client framework gets the raw text and the
            # reason, and may retry or show it, as it would with any other model answer.
            log.info("job %s: malformed tool call: %s", claim.job_id, exc)
            stop_reason = "malformed_tool_call"
        payload = completed_payload(self.result, claim, stop_reason=stop_reason)
        return dataclasses.replace(payload, text=text, tool_calls=tuple(calls))


def completed_payload(result: GenerationResult, claim: Claim, *, stop_reason: str | None = None) -> Completed:
    """The `completed` payload of a generation: text, tokens, usage and timings."""
    t = result.timings
    return Completed(
        text=result.text,
        token_ids=tuple(result.token_ids),
        stop_reason=stop_reason or result.stop_reason,
        canvases=len(result.canvases),
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids),
            prefilled_tokens=result.prefilled_tokens,
        ),
        timings=PayloadTimings(
            queue_s=max(0.0, claim.claimed_at - claim.spec.submitted_at),
            prefill_s=t.prefill_s,
            first_canvas_s=t.first_canvas_s,
            denoise_s=t.denoise_s,
            total_s=t.total_s,
        ),
    )


@dataclass
class _CallWatch:
    """What a generation with client tools committed so far, to stop it at the first complete call."""

    started: float
    ids: list[int] = field(default_factory=list)
    canvases: list[CanvasStats] = field(default_factory=list)
    first_step_at: float | None = None
    first_canvas_s: float = 0.0

    def add(self, event: DraftEvent | CanvasEvent) -> bool:
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
