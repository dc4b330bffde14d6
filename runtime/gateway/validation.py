"""The gateway's edge: requests in as protobuf, validated with pydantic, out as a `JobSpec`.

Everything a client can get wrong is caught here, before anything reaches Redis or Ray, and raised as
`InvalidArgument(field, reason)` with the field's path in the request (`generation.settings.t_min`),
`ModelNotFound` for an unknown model. The prompt is counted with the model's own tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.config import RuntimeSettings, model_name
from blockpress.runtime.contracts.errors import InvalidArgument, InvalidSettings, ModelNotFound
from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.runtime.contracts.settings import TRANSFORMERS_DEFAULTS, DenoiseSettings

__all__ = [
    "AgentIn",
    "GenerationIn",
    "ModelCard",
    "SubmitIn",
    "check_against_model",
    "load_model_card",
    "parse_submit",
]

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _json_object(value: str, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value) if value else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(parsed).__name__}")
    return parsed


class ToolCallIn(_Strict):
    name: str = Field(min_length=1, max_length=128)
    arguments: dict[str, Any]


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant", "model", "tool"]
    content: str
    name: str = Field("", max_length=128)
    tool_calls: tuple[ToolCallIn, ...] = ()

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
            raise ValueError("must be 1-128 characters of letters, digits and . _ : -")
        return value


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What the gateway knows about a served model: its limits, its defaults and its tokenizer."""

    name: str
    path: str
    context_length: int
    canvas_length: int
    dtype: str
    default_max_new_tokens: int
    tokenizer: Any

    def count_prompt(self, body: GenerationIn | AgentIn, *, limit: int | None = None) -> int:
        """Prompt tokens exactly as the engine will count them.

        With `limit`, a prompt whose UTF-8 bytes (plus room for special tokens) are within `limit` is
        not tokenized and its byte bound is returned instead: every token of a byte-level or
        byte-fallback tokenizer covers at least one byte, so such a prompt fits for certain, and the
        common short request skips the tokenizer, the largest cost of admission.
        """
        if isinstance(body, GenerationIn) and body.prompt:
            text, special = body.prompt, True
        else:
            messages = [m.to_template() for m in body.messages]
            if isinstance(body, AgentIn) and body.task.strip() and not messages:
                messages = [{"role": "user", "content": body.task}]
            tools = [t.to_template() for t in body.tools] if isinstance(body, GenerationIn) and body.tools else None
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # a template error is about the messages the caller sent
                raise InvalidArgument("messages", f"the chat template cannot render them ({exc})") from None
            special = False
        bound = len(text.encode()) + _SPECIAL_ROOM
        if limit is not None and bound <= limit:
            return bound
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: a fraction of the Python wrapper's cost
            return len(backend.encode(text, add_special_tokens=special).ids)
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])


# Special tokens a tokenizer may add around a text (<bos>, a dummy prefix), for the byte bound above.
_SPECIAL_ROOM = 16


def load_model_card(path_or_id: str) -> ModelCard:
    """Reads a checkpoint's config, generation config and tokenizer (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path_or_id)
    text = getattr(config, "text_config", config)
    gen_file = Path(path_or_id) / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    dtype = getattr(config, "dtype", None) or getattr(text, "dtype", None) or "bfloat16"
    return ModelCard(
        name=model_name(path_or_id),
        path=path_or_id,
        context_length=int(text.max_position_embeddings),
        canvas_length=int(getattr(config, "canvas_length", 256) or 256),
        dtype=str(dtype).removeprefix("torch."),
        default_max_new_tokens=int(generation.get("max_new_tokens") or TRANSFORMERS_DEFAULTS["max_new_tokens"]),
        tokenizer=AutoTokenizer.from_pretrained(path_or_id),
    )


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


def parse_submit(
    raw: dict[str, Any], settings: RuntimeSettings, *, agent_tools: Collection[str] | None = None
) -> SubmitIn:
    """Validates a request's shape and size (no model needed), raising `InvalidArgument`.

    `agent_tools` are the server-side tools the replicas offer; an agent task naming another is
    refused here. None leaves that check to the replica.
    """
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


def check_against_model(request: SubmitIn, cards: dict[str, ModelCard], default: str) -> ModelCard:
    """The request's model, after checking that the prompt and the new tokens fit its context."""
    name = request.model or default
    card = cards.get(name)
    if card is None:
        raise ModelNotFound(name, sorted(cards))
    body = request.generation or request.agent
    assert body is not None
    where = "generation" if request.generation is not None else "agent"
    max_new = int(body.settings.get("max_new_tokens") or card.default_max_new_tokens)
    if isinstance(body, AgentIn) and body.max_new_tokens:
        max_new = min(max_new, body.max_new_tokens)
    # The engine reserves whole canvases for the new tokens; counting the same way keeps the gateway
    # from accepting a job the replica would refuse.
    reserved = math.ceil(max_new / card.canvas_length) * card.canvas_length
    prompt_tokens = card.count_prompt(body, limit=card.context_length - reserved)
    if prompt_tokens + reserved > card.context_length:
        field = "prompt" if isinstance(body, GenerationIn) and body.prompt else "messages"
        raise InvalidArgument(
            f"{where}.{field}",
            f"{prompt_tokens} prompt tokens + {reserved} tokens reserved for new tokens = "
            f"{prompt_tokens + reserved} tokens, more than the model's context of "
            f"{card.context_length} tokens; shorten the prompt or lower max_new_tokens",
        )
    return card


# ---- protobuf at the edge: requests in, domain types out ----------------------------------------------

_SETTING_FIELDS = (
    "max_new_tokens",
    "max_denoising_steps",
    "t_min",
    "t_max",
    "entropy_bound",
    "stability_threshold",
    "confidence_threshold",
    "seed",
)


def _settings_dict(msg: pb.Settings) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(msg, name) for name in _SETTING_FIELDS if msg.HasField(name)}
    if msg.stop_token_ids:
        out["stop_token_ids"] = list(msg.stop_token_ids)
    return out


def _messages(msgs: Any, where: str) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(msgs):
        calls = []
        for j, c in enumerate(m.tool_calls):
            path = f"{where}.messages[{i}].tool_calls[{j}].arguments_json"
            calls.append({"name": c.name, "arguments": _json_field(c.arguments_json, path)})
        out.append({"role": m.role, "content": m.content, "name": m.name, "tool_calls": calls})
    return out


def _json_field(text: str, path: str) -> dict[str, Any]:
    try:
        return _json_object(text, "the value")
    except ValueError as exc:
        raise InvalidArgument(path, str(exc)) from None


def request_to_dict(req: pb.SubmitRequest) -> dict[str, Any]:
    """A SubmitRequest as plain data for `parse_submit`; JSON-in-string fields are parsed here."""
    out: dict[str, Any] = {"model": req.model, "job_id": req.job_id}
    which = req.WhichOneof("task")
    if which == "generation":
        g = req.generation
        out["generation"] = {
            "prompt": g.prompt,
            "messages": _messages(g.messages, "generation"),
            "settings": _settings_dict(g.settings),
            "drafts": g.drafts,
            "tools": [
                {
                    "name": t.name,
                    "description": t.description,
                    "parameters": _json_field(t.parameters_json, f"generation.tools[{i}].parameters_json"),
                }
                for i, t in enumerate(g.tools)
            ],
            "session_id": g.session_id,
        }
    elif which == "agent":
        a = req.agent
        out["agent"] = {
            "task": a.task,
            "messages": _messages(a.messages, "agent"),
            "tools": list(a.tools),
            "max_turns": a.max_turns,
            "max_new_tokens": a.max_new_tokens,
            "max_seconds": a.max_seconds,
            "settings": _settings_dict(a.settings),
            "drafts": a.drafts,
            "session_id": a.session_id,
        }
    return out


def build_spec(
    request: SubmitIn,
    *,
    job_id: str,
    model: str,
    deadline: float | None,
    trace_context: dict[str, str],
    default_max_turns: int | None = None,
) -> JobSpec:
    """The job to queue for a validated request.

    `default_max_turns` fills an agent task's unset turn limit here, so the job record shows the limit
    the task ran under and every replica applies the gateway's setting.
    """
    body = request.generation or request.agent
    assert body is not None
    common: dict[str, Any] = {
        "job_id": job_id,
        "model": model,
        "settings": dict(body.settings),  # validated by parse_submit, already without unset fields
        "drafts": body.drafts,
        "deadline": deadline,
        "trace_context": trace_context,
        "session_id": body.session_id or None,
        "messages": [m.to_template() for m in body.messages] or None,
    }
    if isinstance(body, GenerationIn):
        return JobSpec(
            kind="generate",
            prompt=body.prompt or None,
            tools=[t.to_template() for t in body.tools],
            **common,
        )
    agent = {
        "task": body.task,
        "tools": list(body.tools),
        "max_turns": body.max_turns or default_max_turns,
        "max_new_tokens": body.max_new_tokens or None,
        "max_seconds": body.max_seconds or None,
    }
    return JobSpec(kind="agent", agent=agent, **common)
