"""Protobuf at the edge: the one place `blockpress.v1` messages become domain types and back.

The gateway reads requests in (`request_to_dict`, then `gateway.validation`) and writes events, job
records, models and spans out (`*_to_pb`); the SDK writes requests (`generation_request`,
`agent_request`) and reads the gateway's answers back (`*_from_pb`). Each `x_from_pb` undoes `x_to_pb`.

Messages become plain data through their descriptors (`message_to_dict`), so 64-bit integers stay
`int` (protobuf's JSON form writes them as strings) and a field added to the proto needs no code here.
Denoising settings map field for field onto `DenoiseSettings`, whose fields name the proto's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.contracts.jobs import Event, EventType, JobRecord, JobState, new_job_id
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.pbdata import fill_message, is_repeated, message_to_dict
from blockpress.runtime.sdk.records import Job, ModelInfo
from blockpress.runtime.sdk.results import result_of

if TYPE_CHECKING:
    from blockpress.runtime.tracing.store import SpanRecord

__all__ = [
    "SETTING_NAMES",
    "agent_request",
    "event_from_pb",
    "event_to_pb",
    "generation_request",
    "job_from_pb",
    "json_depth",
    "message_to_dict",
    "model_info_from_pb",
    "model_info_to_pb",
    "record_to_pb",
    "request_to_dict",
    "settings_from_pb",
    "settings_to_pb",
    "span_to_pb",
    "spans_from_pb",
    "state_from_pb",
    "state_to_pb",
]

Prompt = str | Sequence[Mapping[str, Any]]
"""Prompt text, or chat messages as `{"role", "content", ...}` mappings."""

SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DenoiseSettings) if f.name != "extra")
"""The denoising settings a request carries: `DenoiseSettings`' fields, each a `pb.Settings` field."""

_STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
_STATE_NAMES = {number: state for state, number in _STATES.items()}


# ---- settings ------------------------------------------------------------------------------------------


def settings_from_pb(msg: pb.Settings) -> dict[str, Any]:
    """The settings a request sets; unset fields (and an empty stop list) are the checkpoint's."""
    out: dict[str, Any] = {}
    for name in SETTING_NAMES:
        value = getattr(msg, name)
        if is_repeated(msg.DESCRIPTOR.fields_by_name[name]):
            if value:
                out[name] = list(value)
        elif msg.HasField(name):
            out[name] = value
    return out


def settings_to_pb(settings: Mapping[str, Any], out: pb.Settings, *, where: str = "settings") -> None:
    """Fills `out` from settings by name, skipping None; an unknown name is `InvalidArgument`."""
    for name, value in settings.items():
        if name not in SETTING_NAMES:
            raise InvalidArgument(f"{where}.{name}", f"unknown setting; known: {', '.join(sorted(SETTING_NAMES))}")
        if value is None:
            continue
        if is_repeated(out.DESCRIPTOR.fields_by_name[name]):
            getattr(out, name).extend(value)
        else:
            setattr(out, name, value)


# ---- requests: the SDK writes them, the gateway reads them ----------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


MAX_JSON_DEPTH = 64
"""How deep arrays and objects may nest in JSON a client sends (tool schemas, tool-call arguments):
far past any real schema, and far below the recursion limits of the parsers, templates and
serializers the value passes through later."""


def json_depth(value: Any, *, stop: int = MAX_JSON_DEPTH + 1) -> int:
    """How deep `value` nests (a scalar is 0, `{}` is 1), counted without recursion; stops at `stop`."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list | tuple):
            depth += 1
            deepest = max(deepest, depth)
            if depth >= stop:
                break
            todo.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _json_object(text: str, path: str) -> dict[str, Any]:
    too_deep = f"nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    try:
        parsed = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(path, f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:  # the C parser's own guard, at about 1,000 levels
        raise InvalidArgument(path, too_deep) from None
    if json_depth(parsed) > MAX_JSON_DEPTH:
        raise InvalidArgument(path, too_deep)
    if not isinstance(parsed, dict):
        raise InvalidArgument(path, f"must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _add_messages(task: pb.GenerationTask | pb.AgentTask, messages: Sequence[Mapping[str, Any]]) -> None:
    for m in messages:
        msg = task.messages.add(role=m.get("role", ""), content=m.get("content", ""), name=m.get("name", ""))
        for image in m.get("images", ()):  # the file's bytes, or {"data": bytes, "mime_type"}
            data = image if isinstance(image, bytes) else image["data"]
            mime = "" if isinstance(image, bytes) else image.get("mime_type", "")
            msg.images.add(data=data, mime_type=mime)
        for call in m.get("tool_calls", ()):
            fn = call.get("function", call)  # OpenAI's nesting, or a bare {name, arguments}
            args = fn.get("arguments", {})
            msg.tool_calls.add(name=fn["name"], arguments_json=args if isinstance(args, str) else _json(args))


def generation_request(
    prompt: Prompt,
    *,
    model: str | None = None,
    job_id: str | None = None,
    drafts: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    session_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> pb.SubmitRequest:
    """A generation's SubmitRequest; `tools` are OpenAI-style definitions. A job id is chosen here
    unless given, so that a retried call is the same job."""
    task = pb.GenerationTask(drafts=bool(drafts), session_id=session_id or "")
    if isinstance(prompt, str):
        task.prompt = prompt
    else:
        _add_messages(task, prompt)
    for tool in tools or ():
        fn = tool.get("function", tool)
        task.tools.add(
            name=fn["name"], description=fn.get("description", ""), parameters_json=_json(fn.get("parameters", {}))
        )
    settings_to_pb(settings or {}, task.settings)
    return pb.SubmitRequest(model=model or "", job_id=job_id or new_job_id(), generation=task)


def agent_request(
    task: Prompt,
    *,
    tools: Sequence[str] = (),
    max_turns: int | None = None,
    max_new_tokens: int | None = None,
    max_seconds: float | None = None,
    model: str | None = None,
    job_id: str | None = None,
    drafts: bool = False,
    session_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> pb.SubmitRequest:
    """An agent task's SubmitRequest; `task` is text, or chat messages to continue.

    `max_new_tokens` is the task's budget over all its turns; `settings` are the denoising settings of
    each turn. Zero in the proto means the server's default, as None does here.
    """
    if isinstance(tools, str):  # a lone name would otherwise become one tool per character
        tools = [tools]
    out = pb.AgentTask(
        tools=list(tools),
        max_turns=max_turns or 0,
        max_new_tokens=max_new_tokens or 0,
        max_seconds=max_seconds or 0.0,
        drafts=bool(drafts),
        session_id=session_id or "",
    )
    if isinstance(task, str):
        out.task = task
    else:
        _add_messages(out, task)
    settings_to_pb(settings or {}, out.settings)
    return pb.SubmitRequest(model=model or "", job_id=job_id or new_job_id(), agent=out)


def request_to_dict(req: pb.SubmitRequest) -> dict[str, Any]:
    """A SubmitRequest as the plain data `gateway.validation` checks. JSON-in-string fields are parsed
    here, an error naming the field's path (`generation.tools[0].parameters_json`)."""
    out: dict[str, Any] = {"model": req.model, "job_id": req.job_id}
    which = req.WhichOneof("task")
    if which is None:
        return out
    task = getattr(req, which)
    body = message_to_dict(task)
    body["settings"] = settings_from_pb(task.settings)
    for i, message in enumerate(body["messages"]):
        for j, call in enumerate(message["tool_calls"]):
            path = f"{which}.messages[{i}].tool_calls[{j}].arguments_json"
            message["tool_calls"][j] = {"name": call["name"], "arguments": _json_object(call["arguments_json"], path)}
    if which == "generation":
        for i, tool in enumerate(body["tools"]):
            path = f"generation.tools[{i}].parameters_json"
            tool["parameters"] = _json_object(tool.pop("parameters_json"), path)
    out[which] = body
    return out


# ---- answers: the gateway writes them, the SDK reads them -------------------------------------------


def state_to_pb(state: JobState) -> pb.JobState.ValueType:
    return _STATES[state]


def state_from_pb(value: int) -> JobState:
    return _STATE_NAMES[value]


def _completed_to_pb(data: Mapping[str, Any], out: pb.Completed) -> None:
    # Tool calls carry `arguments` as a mapping while the proto has `arguments_json`: ParseDict with
    # ignore_unknown_fields would drop them silently.
    fill_message({k: v for k, v in data.items() if k != "tool_calls"}, out)
    for call in data.get("tool_calls") or ():
        out.tool_calls.add(name=call["name"], arguments_json=json.dumps(call.get("arguments") or {}))


def _completed_from_pb(msg: pb.Completed) -> dict[str, Any]:
    data = message_to_dict(msg)
    data["tool_calls"] = [{"name": c.name, "arguments": json.loads(c.arguments_json or "{}")} for c in msg.tool_calls]
    return data


def event_to_pb(job_id: str, event: Event) -> pb.JobEvent:
    """A domain event as its proto; unknown payload keys (a newer writer) are ignored."""
    out = pb.JobEvent(id=event.id, job_id=job_id, time=event.ts)
    if event.type == EventType.COMPLETED:
        _completed_to_pb(event.data, out.completed)
    elif event.type in pb.JobEvent.DESCRIPTOR.fields_by_name:
        fill_message(event.data, getattr(out, event.type))
    return out


def event_from_pb(msg: pb.JobEvent) -> Event:
    """The domain event of a `JobEvent`, its payload as `blockpress.runtime.contracts.jobs` documents."""
    kind = msg.WhichOneof("event")
    if kind is None:
        return Event(msg.id, "", {}, msg.time)
    if kind == EventType.COMPLETED:
        return Event(msg.id, kind, _completed_from_pb(msg.completed), msg.time)
    return Event(msg.id, kind, message_to_dict(getattr(msg, kind)), msg.time)


def record_to_pb(record: JobRecord) -> pb.Job:
    """A job record as `GetJob` answers it; None times and a missing deadline are 0 on the wire."""
    job = pb.Job(
        job_id=record.job_id,
        model=record.model,
        kind=record.spec.kind,
        state=state_to_pb(record.state),
        attempt=record.attempt,
        submitted_at=record.submitted_at,
        deadline=record.spec.deadline or 0.0,
        replica=record.replica or "",
        cancel_requested=record.cancel_requested,
        started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0,
    )
    if record.result is not None:
        _completed_to_pb(record.result, job.result)
    if record.error is not None:
        fill_message(record.error, job.error)
    return job


def job_from_pb(msg: pb.Job) -> Job:
    """The SDK's `Job` of a `GetJob` answer."""
    return Job(
        job_id=msg.job_id,
        model=msg.model,
        kind=msg.kind,
        state=state_from_pb(msg.state),
        attempt=msg.attempt,
        submitted_at=msg.submitted_at,
        deadline=msg.deadline or None,
        replica=msg.replica or None,
        cancel_requested=msg.cancel_requested,
        started_at=msg.started_at or None,
        finished_at=msg.finished_at or None,
        result=result_of(msg.job_id, _completed_from_pb(msg.result)) if msg.HasField("result") else None,
        error=message_to_dict(msg.error) if msg.HasField("error") else None,
    )


def model_info_to_pb(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**{f.name: getattr(info, f.name) for f in fields(info)})


def model_info_from_pb(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(**message_to_dict(msg))


def span_to_pb(record: SpanRecord) -> pb.Span:
    """A kept span as its proto; attributes and events travel as JSON, as their values are of any type."""
    events = [{"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes} for e in record.events]
    return pb.Span(
        trace_id=record.trace_id,
        span_id=record.span_id,
        parent_id=record.parent_id or "",
        name=record.name,
        start_ns=record.start_ns,
        end_ns=record.end_ns,
        service=record.service,
        kind=record.kind,
        status=record.status,
        status_message=record.status_message,
        attributes_json=json.dumps(record.attributes, separators=(",", ":"), default=str),
        events_json=json.dumps(events, separators=(",", ":"), default=str),
    )


def spans_from_pb(trace: pb.Trace) -> list[SpanRecord]:
    """A `GetTrace` answer as the trace store's records, which `blockpress.runtime.tracing.view` renders."""
    # Here, not at the top: the trace store brings redis and the OpenTelemetry SDK, which a client
    # that never asks for a trace should not pay to import.
    from blockpress.runtime.tracing.store import SpanEventRecord, SpanRecord

    out = []
    for s in trace.spans:
        events = [
            SpanEventRecord(e["name"], int(e["time_ns"]), e.get("attributes", {}))
            for e in json.loads(s.events_json or "[]")
        ]
        fields_ = message_to_dict(s)
        del fields_["attributes_json"], fields_["events_json"]
        fields_["parent_id"] = s.parent_id or None
        out.append(SpanRecord(**fields_, attributes=json.loads(s.attributes_json or "{}"), events=events))
    return out
