"""The payloads of a job's events, typed: one class per event type, mirroring the proto message of
the same name (proto/blockpress/v1/runtime.proto; a test holds them to it field for field).

Producers build these classes and `to_data` turns one into the JSON-ready mapping the queue stores
with `blockpress.runtime.contracts.jobs.dumps`; readers get it back with `from_data(type, data)`,
which ignores keys a newer writer added. A field that is None is left out of the mapping. Tool-call
arguments are a mapping here and JSON text on the wire (`arguments_json`), the one place the two
differ; the agent's `turns` record is kept in the job record only (the wire has no field for it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from blockpress.runtime.contracts.jobs import EventType

__all__ = [
    "PAYLOADS",
    "PAYLOAD_TYPES",
    "Cancelled",
    "Canvas",
    "Completed",
    "DeadLettered",
    "Draft",
    "ErrorInfo",
    "Expired",
    "Failed",
    "Payload",
    "Queued",
    "Started",
    "Timings",
    "ToolCall",
    "ToolCallEvent",
    "ToolResult",
    "Turn",
    "Usage",
    "from_data",
    "to_data",
]

_FROZEN = {"frozen": True, "slots": True, "kw_only": True}


@dataclass(**_FROZEN)
class Queued:
    model: str = ""


@dataclass(**_FROZEN)
class Started:
    attempt: int = 0
    replica: str = ""


@dataclass(**_FROZEN)
class Draft:
    """The canvas while it is denoised (only for jobs that asked for drafts; throttled)."""

    canvas_index: int = 0
    step: int = 0
    text: str = ""


@dataclass(**_FROZEN)
class Canvas:
    """A committed canvas."""

    index: int = 0
    text: str = ""
    steps: int = 0
    tokens: int = 0


@dataclass(**_FROZEN)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefilled_tokens: int = 0
    """Prompt tokens the encoder actually ran (fewer than the prompt on a warm session)."""


@dataclass(**_FROZEN)
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_canvas_s: float = 0.0
    denoise_s: float = 0.0
    total_s: float = 0.0


@dataclass(**_FROZEN)
class ToolCall:
    """A call the model made to one of the client's tools."""

    name: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(**_FROZEN)
class Completed:
    text: str = ""
    token_ids: tuple[int, ...] = ()
    stop_reason: str = ""
    """stop_token or max_new_tokens; with client tools also tool_call or malformed_tool_call (agents:
    final_answer, max_turns, max_new_tokens, max_seconds)."""
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    canvases: int = 0
    tool_calls: tuple[ToolCall, ...] | None = None
    """The calls the model made to the client's tools; None (left out) when the job sent no tools."""
    turns: tuple[Mapping[str, Any], ...] | None = None
    """An agent task's turn records (not on the wire)."""


@dataclass(**_FROZEN)
class ErrorInfo:
    code: str = "INTERNAL"
    """A status code name (INVALID_ARGUMENT, ...)."""
    message: str = ""


@dataclass(**_FROZEN)
class Failed:
    error: ErrorInfo = field(default_factory=ErrorInfo)
    attempt: int = 0


@dataclass(**_FROZEN)
class Cancelled:
    reason: str = ""


@dataclass(**_FROZEN)
class Expired:
    deadline: float | None = None


@dataclass(**_FROZEN)
class DeadLettered:
    error: ErrorInfo = field(default_factory=ErrorInfo)
    deliveries: int = 0


@dataclass(**_FROZEN)
class Turn:
    index: int = 0
    text: str = ""


@dataclass(**_FROZEN)
class ToolCallEvent:
    turn: int = 0
    call_id: str = ""
    name: str = ""
    arguments_json: str = "{}"


@dataclass(**_FROZEN)
class ToolResult:
    turn: int = 0
    call_id: str = ""
    name: str = ""
    content: str = ""
    is_error: bool = False


Payload = (
    Queued | Started | Draft | Canvas | Completed | Failed | Cancelled | Expired | DeadLettered | Turn
    | ToolCallEvent | ToolResult
)  # fmt: skip

PAYLOADS: Final[Mapping[str, type[Any]]] = {
    EventType.QUEUED: Queued,
    EventType.STARTED: Started,
    EventType.DRAFT: Draft,
    EventType.CANVAS: Canvas,
    EventType.COMPLETED: Completed,
    EventType.FAILED: Failed,
    EventType.CANCELLED: Cancelled,
    EventType.EXPIRED: Expired,
    EventType.DEAD_LETTERED: DeadLettered,
    EventType.TURN: Turn,
    EventType.TOOL_CALL: ToolCallEvent,
    EventType.TOOL_RESULT: ToolResult,
}
PAYLOAD_TYPES: Final[tuple[type[Any], ...]] = tuple(PAYLOADS.values())
"""For `isinstance(x, PAYLOAD_TYPES)`."""
_TYPES: Final = {cls: name for name, cls in PAYLOADS.items()}


def to_data(payload: Payload) -> tuple[str, dict[str, Any]]:
    """The event type and the JSON-ready mapping the queue stores for `payload`."""
    return _TYPES[type(payload)], _plain(payload)


def from_data(event_type: str, data: Mapping[str, Any]) -> Payload:
    """The typed payload of a stored event; unknown keys (a newer writer) are ignored.

    Raises:
        KeyError: `event_type` is not an event type this version knows.
    """
    return _build(PAYLOADS[event_type], data)  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # None is "not set" and is left out, so a reader tells an absent list from an empty one.
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {name: _plain(v) for name, v in items if v is not None}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(cls: type[Any], data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items() if k in known})


def _coerce(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return _build(hint, value)  # type: ignore[arg-type]
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return tuple(_coerce(item, v) for v in value)
    if hint is int and isinstance(value, str | float) and not isinstance(value, bool):
        return int(value)  # int64 fields that went through JSON as strings
    if hint is float and isinstance(value, int | str):
        return float(value)
    return value
