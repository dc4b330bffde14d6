"""The gateway's edge: a request as plain data in, validated with pydantic, a `JobSpec` out.

`validate_submit` is the one way in: it checks the request's shape and limits (no model needed), then
that the prompt and the new tokens fit the model's context, and builds the job to queue. Everything a
client can get wrong is caught here, before anything reaches Redis or Ray, and raised as
`InvalidArgument(field, reason)` with the field's path in the request (`generation.settings.t_min`),
`ModelNotFound` for an unknown model. The prompt is counted with the model's own tokenizer. The
request comes as plain data (`blockpress.runtime.convert.request_to_dict` for gRPC), so any front can
use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import InvalidArgument, InvalidSettings, ModelNotFound
from blockpress.runtime.contracts.jobs import JobSpec, new_job_id
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.convert import MAX_JSON_DEPTH, json_depth
from blockpress.runtime.gateway.cards import ModelCard
from blockpress.runtime.gateway.images import check_images

__all__ = ["AgentIn", "GenerationIn", "SubmitIn", "validate_event_id", "validate_submit"]

_ID = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")
_EVENT_ID = re.compile(r"\A([0-9]{1,20})(?:-([0-9]{1,20}))?\Z")


def validate_event_id(value: str, field: str = "after_event_id") -> str:
    """A Redis stream id a client resumes after (`<ms>-<seq>`, `<ms>`, or empty: from the start).

    Redis refuses anything else with an error that would read as an outage; this names the field.
    """
    match = _EVENT_ID.match(value or "0")
    if match is None or any(int(part) >= 2**64 for part in match.groups("0")):
        raise InvalidArgument(field, f"{value!r} is not an event id; send the id of an event (like 1700000000000-0)")
    return value or "0"


def _shallow(value: Any) -> Any:
    # Before pydantic walks the value: its walk, the chat template and the Redis serializer all recurse.
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolCallIn(_Strict):
    name: str = Field(min_length=1, max_length=128)
    arguments: dict[str, Any]

    _arguments_depth = field_validator("arguments", mode="before")(_shallow)


class ImageIn(_Strict):
    data: bytes
    mime_type: str = Field("", max_length=64)


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant", "model", "tool"]
    content: str
    name: str = Field("", max_length=128)
    tool_calls: tuple[ToolCallIn, ...] = ()
    images: tuple[ImageIn, ...] = ()
    """Checked by `gateway.images.check_images` (format, size, count), which the job carries instead."""

    @model_validator(mode="after")
    def _tool_needs_name(self) -> ChatMessageIn:
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs the name of the tool that answered")
        return self

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template takes it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls
            ]
        return out


class ToolIn(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
    description: str = Field("", max_length=8192)
    parameters: dict[str, Any]

    _parameters_depth = field_validator("parameters", mode="before")(_shallow)

    def to_template(self) -> dict[str, Any]:
        """OpenAI-style definition, as the chat template takes it."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


class GenerationIn(_Strict):
    prompt: str = ""
    messages: tuple[ChatMessageIn, ...] = ()
    settings: dict[str, Any] = Field(default_factory=dict)
    drafts: bool = False
    tools: tuple[ToolIn, ...] = ()
    session_id: str = Field("", pattern=r"^([A-Za-z0-9._:-]{1,128})?$")


class AgentIn(_Strict):
    task: str = ""
    messages: tuple[ChatMessageIn, ...] = ()
    tools: tuple[str, ...] = ()
    max_turns: int = Field(0, ge=0, le=256)
    max_new_tokens: int = Field(0, ge=0)
    max_seconds: float = Field(0.0, ge=0, allow_inf_nan=False)
    settings: dict[str, Any] = Field(default_factory=dict)
    drafts: bool = False
    session_id: str = Field("", pattern=r"^([A-Za-z0-9._:-]{1,128})?$")

    @field_validator("tools")
    @classmethod
    def _unique(cls, tools: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(tools)) != len(tools):
            raise ValueError("lists a tool twice")
        return tools


class SubmitIn(_Strict):
    model: str = Field("", max_length=512)
    job_id: str = ""
    generation: GenerationIn | None = None
    agent: AgentIn | None = None

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str) -> str:
        if value and not _ID.match(value):
            raise ValueError("must be 1-128 characters of ASCII letters, digits and . _ - (nothing else, no newline)")
        return value


def validate_submit(
    raw: Mapping[str, Any],
    *,
    settings: RuntimeSettings,
    cards: Mapping[str, ModelCard],
    default_model: str,
    deadline: float | None = None,
    trace_context: Mapping[str, str] | None = None,
    agent_tools: Collection[str] | None = None,
) -> JobSpec:
    """The job to queue for a request, or the `InvalidArgument` / `ModelNotFound` to answer.

    Args:
        raw: the request as plain data (`request_to_dict`).
        settings: the gateway's limits (prompt characters, messages, tools) and defaults.
        cards: the served models by name; `default_model` serves a request that names none.
        deadline: epoch seconds past which the client no longer waits.
        trace_context: W3C headers of the submitting call, for the job's spans to join its trace.
        agent_tools: the server-side tools the replicas offer, so that an agent task naming another is
            refused here; None leaves that check to the replica.
    """
    request = _parse(raw, settings, agent_tools)
    body = request.generation or request.agent
    assert body is not None  # _parse refuses a request without a task
    where = "generation" if request.generation is not None else "agent"
    messages = [m.to_template() for m in body.messages]
    for message, carried in zip(messages, check_images(body.messages, where, settings), strict=True):
        if carried:
            message["images"] = carried
    card = _check_model(request, body, where, messages, cards, default_model)
    common: dict[str, Any] = {
        "job_id": request.job_id or new_job_id(),
        "model": card.name,
        "settings": dict(body.settings),  # validated by _parse, already without unset fields
        "drafts": body.drafts,
        "deadline": deadline,
        "trace_context": dict(trace_context or {}),
        "session_id": body.session_id or None,
        "messages": messages or None,
    }
    if isinstance(body, GenerationIn):
        return JobSpec(
            kind="generate", prompt=body.prompt or None, tools=[t.to_template() for t in body.tools], **common
        )
    agent = {
        "task": body.task,
        "tools": list(body.tools),
        # Filled here, so the job record shows the limit the task ran under and every replica applies
        # the gateway's setting.
        "max_turns": body.max_turns or settings.agent_default_max_turns,
        "max_new_tokens": body.max_new_tokens or None,
        "max_seconds": body.max_seconds or None,
    }
    return JobSpec(kind="agent", agent=agent, **common)


def _field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "tagged-")):  # pydantic's internal validator names
            out = f"{out}.{part}" if out else part
    return out


def _reason(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _parse(raw: Mapping[str, Any], settings: RuntimeSettings, agent_tools: Collection[str] | None) -> SubmitIn:
    """The request's shape and size, checked without a model."""
    try:
        request = SubmitIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidArgument(_field_path("", first["loc"]) or "request", _reason(first["msg"])) from None
    body = request.generation or request.agent
    if body is None:
        raise InvalidArgument("task", "is not set; send a generation or an agent task")
    where = "generation" if request.generation is not None else "agent"
    # Cross-field rules live here rather than in model validators, so the error names the exact field.
    if isinstance(body, GenerationIn):
        if body.prompt and body.messages:
            raise InvalidArgument("generation.prompt", "send either a prompt or messages, not both")
        if not body.prompt.strip() and not body.messages:
            raise InvalidArgument("generation.prompt", "is empty; send a prompt or at least one message")
        if body.tools and not body.messages:
            raise InvalidArgument("generation.tools", "tools need chat messages: the chat template renders them")
    else:
        if not body.task.strip() and not body.messages:
            raise InvalidArgument("agent.task", "is empty; send a task or at least one message")
        unknown = [name for name in body.tools if agent_tools is not None and name not in agent_tools]
        if unknown:
            known = sorted(agent_tools or ())
            raise InvalidArgument(
                "agent.tools", f"unknown tool {unknown[0]!r}; the replicas have: {', '.join(known) or 'none'}"
            )
    texts = [("prompt", body.prompt)] if isinstance(body, GenerationIn) else [("task", body.task)]
    texts += [(f"messages[{i}].content", m.content) for i, m in enumerate(body.messages)]
    for field, text in texts:
        if len(text) > settings.max_prompt_chars:
            raise InvalidArgument(
                f"{where}.{field}",
                f"is {len(text)} characters, more than the limit of {settings.max_prompt_chars}",
            )
    if len(body.messages) > settings.max_messages:
        raise InvalidArgument(f"{where}.messages", f"has {len(body.messages)} messages, limit {settings.max_messages}")
    if len(body.tools) > settings.max_tools:
        raise InvalidArgument(f"{where}.tools", f"has {len(body.tools)} tools, limit {settings.max_tools}")
    try:
        DenoiseSettings.from_mapping(body.settings)
    except InvalidSettings as exc:
        raise InvalidArgument(f"{where}.settings.{exc.field}", exc.reason) from None
    return request


def _check_model(
    request: SubmitIn,
    body: GenerationIn | AgentIn,
    where: str,
    messages: list[dict[str, Any]],
    cards: Mapping[str, ModelCard],
    default: str,
) -> ModelCard:
    """The request's model, after checking that the prompt and the new tokens fit its context."""
    name = request.model or default
    card = cards.get(name)
    if card is None:
        raise ModelNotFound(name, sorted(cards))
    max_new = int(body.settings.get("max_new_tokens") or card.default_max_new_tokens)
    if isinstance(body, AgentIn) and body.max_new_tokens:
        max_new = min(max_new, body.max_new_tokens)
    # The engine reserves whole canvases for the new tokens; counting the same way keeps the gateway
    # from accepting a job the replica would refuse.
    reserved = math.ceil(max_new / card.canvas_length) * card.canvas_length
    limit = card.context_length - reserved
    if isinstance(body, GenerationIn):
        tools = [t.to_template() for t in body.tools]
        prompt_tokens = card.count_prompt(prompt=body.prompt, messages=messages, tools=tools, limit=limit)
    else:
        if body.task.strip() and not messages:  # the task is the user message of the first turn
            messages = [{"role": "user", "content": body.task}]
        prompt_tokens = card.count_prompt(messages=messages, limit=limit)
    if prompt_tokens + reserved > card.context_length:
        field = "prompt" if isinstance(body, GenerationIn) and body.prompt else "messages"
        raise InvalidArgument(
            f"{where}.{field}",
            f"{prompt_tokens} prompt tokens + {reserved} tokens reserved for new tokens = "
            f"{prompt_tokens + reserved} tokens, more than the model's context of "
            f"{card.context_length} tokens; shorten the prompt or lower max_new_tokens",
        )
    return card
