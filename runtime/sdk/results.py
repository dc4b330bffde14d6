"""What the SDK returns for a finished job: `Result` and `AgentResult`, built from the job's events.

A job that ran and did not succeed is not a result: `outcome` raises the `JobError` its final event
stands for (`JobFailed`, `JobCancelled`, `JobExpired`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from blockpress.runtime.contracts.errors import BlockPressError, JobCancelled, JobExpired, JobFailed
from blockpress.runtime.contracts.events import Usage
from blockpress.runtime.contracts.jobs import Event, EventType

_USAGE_FIELDS = frozenset(f.name for f in fields(Usage))

__all__ = ["AgentResult", "AgentToolCall", "Result", "ToolCall", "Usage", "job_outcome", "outcome", "result_of"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made to one of the client's tools; the caller runs it and sends the answer back."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    """A finished generation."""

    job_id: str
    text: str
    token_ids: list[int]
    stop_reason: str
    """`stop_token` or `max_new_tokens`; with client `tools` also `tool_call` (see `tool_calls`) or
    `malformed_tool_call` (the model opened a call it did not write correctly)."""
    usage: Usage
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: queue_s, prefill_s, first_canvas_s, denoise_s, total_s."""
    canvases: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the model made to the client's tools (a generation with `tools` only)."""


@dataclass(frozen=True, slots=True)
class AgentToolCall(ToolCall):
    """One tool call an agent made, with what the tool answered."""

    turn: int
    result: str | None = None
    """The tool's answer as the model saw it (truncated for the event stream); None if it never ran."""
    is_error: bool = False
    call_id: str = ""


@dataclass(frozen=True, slots=True)
class AgentResult(Result):
    """A finished agent task: its final answer in `text`, how it ended in `stop_reason`
    (`final_answer`, `max_turns`, `max_new_tokens`, `max_seconds`), and the calls it made."""

    turns: int = 0
    """Model turns the task took."""
    tool_calls: tuple[AgentToolCall, ...] = ()


def result_of(job_id: str, completed: Mapping[str, Any]) -> Result:
    """The `Result` of a `completed` payload (`blockpress.runtime.contracts.jobs`)."""
    return Result(
        job_id=job_id,
        text=completed.get("text", ""),
        token_ids=list(completed.get("token_ids", ())),
        stop_reason=completed.get("stop_reason", ""),
        usage=Usage(**{k: int(v) for k, v in (completed.get("usage") or {}).items() if k in _USAGE_FIELDS}),
        timings=dict(completed.get("timings", {})),
        canvases=completed.get("canvases", 0),
        tool_calls=tuple(ToolCall(c["name"], dict(c.get("arguments") or {})) for c in completed.get("tool_calls", ())),
    )


def outcome(job_id: str, event: Event) -> Result:
    """The result of a job's final event, or the `JobError` it stands for."""
    d = event.data
    if event.type == EventType.COMPLETED:
        return result_of(job_id, d)
    error = d.get("error") or {}
    if event.type in (EventType.FAILED, EventType.DEAD_LETTERED):
        state = "DEAD_LETTERED" if event.type == EventType.DEAD_LETTERED else "FAILED"
        raise JobFailed(job_id, error.get("code", "UNKNOWN"), error.get("message", ""), state=state)
    if event.type == EventType.CANCELLED:
        raise JobCancelled(job_id, d.get("reason") or "cancelled")
    if event.type == EventType.EXPIRED:
        raise JobExpired(job_id, "its deadline passed before it ran")
    raise BlockPressError(f"job {job_id}: unexpected final event {event.type!r}")


def job_outcome(job_id: str, events: Sequence[Event]) -> Result:
    """The result of a job from all its events: an `AgentResult` for an agent task (its events hold
    turns), else a `Result`; or the `JobError` the job ended in."""
    result = outcome(job_id, events[-1])
    if not any(e.type == EventType.TURN for e in events):
        return result
    calls: dict[str, dict[str, Any]] = {}
    turns: set[int] = set()
    for e in events:
        d = e.data
        if e.type == EventType.TURN:
            turns.add(d.get("index", 0))
        elif e.type == EventType.TOOL_CALL:
            # Keyed by call id: a redelivered job re-emits a call it resumes, which is still one call.
            calls[d.get("call_id", e.id)] = {
                "turn": d.get("turn", 0),
                "name": d.get("name", ""),
                "arguments": json.loads(d.get("arguments_json") or "{}"),
                "call_id": d.get("call_id", ""),
            }
        elif e.type == EventType.TOOL_RESULT and d.get("call_id", e.id) in calls:
            calls[d.get("call_id", e.id)].update(result=d.get("content", ""), is_error=bool(d.get("is_error")))
    common = {f.name: getattr(result, f.name) for f in fields(Result) if f.name != "tool_calls"}
    return AgentResult(**common, turns=len(turns), tool_calls=tuple(AgentToolCall(**c) for c in calls.values()))
