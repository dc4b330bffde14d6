"""The HTTP front's request and response bodies, as pydantic models: OpenAI's chat completions and models,
Anthropic's messages, and BlockPress's own agent tasks.

Requests accept what the real clients send (unknown fields are kept, not refused: frameworks add new
ones every release); `chat.py` and `anthropic.py` read the fields BlockPress knows, and pick the
denoising settings (`DenoiseSettings`' names: `t_min`, `max_denoising_steps`, ...) out of the extra
fields. Responses carry exactly the fields of the peer API, plus `blockpress` extension fields where
documented.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AgentRequest",
    "AnthropicRequest",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ErrorBody",
    "ErrorResponse",
    "ModelCardOut",
    "ModelList",
]


class _Open(BaseModel):
    """A request part: fields BlockPress does not use are accepted and kept in `model_extra`."""

    model_config = ConfigDict(extra="allow")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- OpenAI chat completions: request ------------------------------------------------------------------


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str
    detail: str | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"
    """The call's arguments as JSON text, as OpenAI writes them."""


class ToolCallIn(_Open):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Open):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class _Named(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: _Named


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """`POST /v1/chat/completions`. Extension fields: `drafts` (stream `blockpress.draft` chunks),
    `session_id` (the KV-cache session), and the denoising settings by name."""

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request: a replica runs at batch size 1")
    prompt_cache_key: str | None = None
    drafts: bool = False
    session_id: str | None = None


# ---- OpenAI chat completions: response -----------------------------------------------------------------


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class PromptTokensDetails(_Out):
    cached_tokens: int = 0
    """Prompt tokens served from the replica's KV cache (a warm session): not run by the encoder again."""


class UsageOut(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: UsageOut
    system_fingerprint: str | None = None


class FunctionDelta(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    blockpress: dict[str, Any] | None = None
    """Extension: `{"draft": {canvas_index, step, text}}` on a draft chunk (with `choices` empty)."""


# ---- models and errors -----------------------------------------------------------------------------------


class ModelCardOut(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "blockpress"
    context_length: int
    """The model's context in tokens, under the name OpenRouter and LiteLLM read."""
    max_model_len: int
    """The same, under the name vLLM serves it."""
    canvas_length: int


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCardOut]


class ErrorBody(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorBody


# ---- Anthropic messages ----------------------------------------------------------------------------------


class AnthropicBlock(_Open):
    """One content block: text, image, tool_use {id, name, input} or tool_result {tool_use_id, content}."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthropicBlock] | None = None
    is_error: bool = False


class AnthropicMessage(_Open):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(_Open):
    name: str
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class AnthropicToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None


class AnthropicRequest(_Open):
    """`POST /v1/messages`; the denoising settings ride along as extra fields, as on chat completions."""

    model: str = ""
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    stream: bool = False
    stop_sequences: list[str] | None = None
    session_id: str | None = None


# ---- BlockPress agent tasks ------------------------------------------------------------------------------


class AgentRequest(_Open):
    """`POST /v1/blockpress/agent`: a server-side agent task (its tools run beside the engine)."""

    model: str = ""
    task: str = ""
    messages: list[ChatMessage] | None = None
    tools: list[str] = Field(default_factory=list)
    """Names of the server's tools (`calculator`, `python`, ...)."""
    max_turns: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)
    stream: bool = False
    drafts: bool = False
    session_id: str | None = None
