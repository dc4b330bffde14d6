"""Jobs as the runtime sees them: the envelope a client submits, its record, its events.

These are plain domain types. The gateway converts protobuf messages to them (and back) at the edge;
the queue stores them in Redis through the one serializer at the bottom of this module
(`dumps`/`loads`: JSON, never pickle), so any language can read a job record.

Event payloads (`Event.data`) follow the proto messages of the same name (proto/blockpress/v1):

    queued         {model}
    started        {attempt, replica}
    draft          {canvas_index, step, text}
    canvas         {index, text, steps, tokens}
    turn           {index, text}
    tool_call      {turn, call_id, name, arguments_json}
    tool_result    {turn, call_id, name, content, is_error}
    completed      {text, token_ids, stop_reason, canvases, usage: {prompt_tokens, completion_tokens,
                    prefilled_tokens}, timings: {queue_s, prefill_s, first_canvas_s, denoise_s, total_s}}
                   with client tools (`JobSpec.tools`) also tool_calls: [{name, arguments}], and
                   stop_reason "tool_call" (or "malformed_tool_call", `text` then the raw turn);
                   usage.prefilled_tokens counts prompt tokens the encoder ran (fewer than
                   prompt_tokens when a session's cache was warm)
    failed         {error: {code, message}, attempt}
    cancelled      {reason}
    expired        {deadline}
    dead_lettered  {error: {code, message}, deliveries}

A job's event stream ends with exactly one of the final types (`FINAL_EVENT_TYPES`).
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "FINAL_EVENT_TYPES",
    "Event",
    "EventType",
    "JobKind",
    "JobRecord",
    "JobSpec",
    "JobState",
    "dumps",
    "loads",
    "new_job_id",
]

JobKind = Literal["generate", "agent"]


class JobState(enum.StrEnum):
    """Where a job is in its life. The last five are final: nothing changes a final job again."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    DEAD_LETTERED = "DEAD_LETTERED"

    @property
    def is_final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class EventType:
    """The `type` of an `Event` (docs/CONTRACTS.md, "Job envelope and events")."""

    QUEUED: Final = "queued"
    STARTED: Final = "started"
    DRAFT: Final = "draft"
    CANVAS: Final = "canvas"
    TURN: Final = "turn"
    TOOL_CALL: Final = "tool_call"
    TOOL_RESULT: Final = "tool_result"
    COMPLETED: Final = "completed"
    FAILED: Final = "failed"
    CANCELLED: Final = "cancelled"
    EXPIRED: Final = "expired"
    DEAD_LETTERED: Final = "dead_lettered"


# The final event each final state writes; a watcher stops after one of these.
FINAL_EVENT_TYPES: Final[Mapping[JobState, str]] = {
    JobState.SUCCEEDED: EventType.COMPLETED,
    JobState.FAILED: EventType.FAILED,
    JobState.CANCELLED: EventType.CANCELLED,
    JobState.EXPIRED: EventType.EXPIRED,
    JobState.DEAD_LETTERED: EventType.DEAD_LETTERED,
}


def new_job_id() -> str:
    """A fresh job id for a client that did not choose one."""
    return uuid.uuid4().hex


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a client asked for; immutable once queued. Field meanings: docs/CONTRACTS.md."""

    job_id: str
    """Client-chosen idempotency key, or `new_job_id()`; the same id submitted twice is one job."""
    model: str
    """The served model name; it selects the queue."""
    kind: JobKind = "generate"
    prompt: str | None = None
    """Raw prompt text; exactly one of `prompt` and `messages` is set for a generation."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages rendered with the model's chat template."""
    settings: dict[str, Any] = field(default_factory=dict)
    """A `DenoiseSettings.to_mapping()`; the engine validates it again."""
    drafts: bool = False
    """Stream throttled `draft` events while a canvas is denoised."""
    deadline: float | None = None
    """Epoch seconds; a job still queued then ends EXPIRED and never starts."""
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C trace headers of the submitting call."""
    session_id: str | None = None
    """Keeps a conversation's KV cache warm on the replica across jobs."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Client-side tool definitions (OpenAI style)."""
    agent: dict[str, Any] | None = None
    """Agent task fields (task, tools, max_turns, ...) when `kind == "agent"`."""
    submitted_at: float = field(default_factory=time.time)
    """Epoch seconds the gateway accepted the job."""

    def to_dict(self) -> dict[str, Any]:
        # Shallow, not dataclasses.asdict: the fields are JSON values already, and asdict's deep copy
        # was a measurable share of the gateway's CPU per submit.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuilds a spec written by `to_dict`, ignoring keys a newer writer may have added."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """A snapshot of one job as stored in Redis."""

    spec: JobSpec
    state: JobState
    attempt: int = 0
    """Runs started so far; the current run's number while RUNNING. Fences every write of a run."""
    deliveries: int = 0
    """Times the queue handed the job to a replica (a run that never starts still counts)."""
    replica: str | None = None
    """The replica of the latest attempt."""
    result: dict[str, Any] | None = None
    """The `completed` payload once SUCCEEDED."""
    error: dict[str, str] | None = None
    """`{code, message}` once FAILED or DEAD_LETTERED; while queued again, the last attempt's error."""
    cancel_requested: bool = False
    submitted_at: float = 0.0
    started_at: float | None = None
    """Epoch seconds the latest attempt started."""
    finished_at: float | None = None

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def model(self) -> str:
        return self.spec.model


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a job's event stream; `id` is the Redis stream id, usable as `after` to resume."""

    id: str
    type: str
    data: dict[str, Any]
    ts: float
    """Epoch seconds the event was written."""

    @property
    def is_final(self) -> bool:
        return self.type in FINAL_EVENT_TYPES.values()


def dumps(value: Any) -> str:
    """The one serializer for what goes into Redis: compact JSON, NaN and infinity refused."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(text: str | bytes | None) -> Any:
    """The inverse of `dumps`; None stays None."""
    if text is None:
        return None
    return json.loads(text)
