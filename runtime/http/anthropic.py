"""Anthropic's messages API over BlockPress jobs (`POST /v1/messages`), for Claude Code and its kin.

The same path as chat completions (`chat.py`): the body becomes the domain's chat messages and tools,
the one validation runs, and the job's events come back as a `message` or as Anthropic's stream
(`message_start`, content blocks of text and `tool_use`, `message_delta`, `message_stop`). A
`tool_result` block answers the `tool_use` whose id it names and becomes the chat template's tool
message with that tool's name. `max_tokens` is `max_new_tokens`; `stop_sequences` cut the text at the
edge; the denoising settings ride as extra fields. Image blocks with base64 sources become the
message's images, as `image_url` parts do on chat completions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.contracts.events import Completed
from blockpress.runtime.contracts.jobs import Event, EventType, JobSpec
from blockpress.runtime.http import protocol as p
from blockpress.runtime.http.chat import completed_of, decode_base64
from blockpress.runtime.http.jobs import TextCut, derive_session, session_key, settings_from_extra

__all__ = ["MessageTurn", "anthropic_param", "submit_body"]

_STOP = {"tool_call": "tool_use", "max_new_tokens": "max_tokens"}


def _text(content: str | list[p.AnthropicBlock] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, block in enumerate(content):
        if block.type != "text":
            raise InvalidArgument(f"{where}[{j}]", f"a {block.type!r} block is not supported here")
        parts.append(block.text or "")
    return "\n".join(parts)


def messages_of(req: p.AnthropicRequest, places: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The request's system prompt and messages as the domain's chat messages; `places` gets the body's
    name of each image, for an error about it (`anthropic_param`)."""
    places = places if places is not None else {}
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    names: dict[str, str] = {}  # tool_use id -> tool name
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        blocks = [p.AnthropicBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "assistant":
            texts = [b.text or "" for b in blocks if b.type == "text"]
            calls = []
            for b in blocks:
                if b.type == "tool_use":
                    calls.append({"name": b.name or "", "arguments": dict(b.input or {})})
                    names[b.id or ""] = b.name or ""
            out.append({"role": "assistant", "content": "".join(texts), "tool_calls": calls})
            continue
        texts = []
        images: list[dict[str, Any]] = []
        for j, b in enumerate(blocks):
            if b.type == "image":
                places[f"messages[{len(out)}].images[{len(images)}]"] = f"{where}[{j}].source"
                images.append(_image(b, f"{where}[{j}].source"))
            elif b.type == "tool_result":
                name = names.get(b.tool_use_id or "")
                if not name:
                    raise InvalidArgument(f"{where}[{j}].tool_use_id", "answers no tool_use of an earlier message")
                out.append({"role": "tool", "name": name, "content": _text(b.content, f"{where}[{j}].content")})
            elif b.type == "text":
                texts.append(b.text or "")
            else:
                raise InvalidArgument(f"{where}[{j}]", f"a {b.type!r} block is not supported by this gateway yet")
        if texts or images:
            out.append({"role": "user", "content": "\n".join(texts), **({"images": images} if images else {})})
    return out


def _image(block: p.AnthropicBlock, where: str) -> dict[str, Any]:
    """An image block's bytes: `{"type": "base64", "media_type", "data"}` (URL sources are not fetched)."""
    source = (block.model_extra or {}).get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise InvalidArgument(
            where, "send the image inline: {'type': 'base64', 'media_type', 'data'}; URLs are not fetched"
        )
    return {
        "data": decode_base64(str(source.get("data", "")), f"{where}.data"),
        "mime_type": source.get("media_type", ""),
    }


def submit_body(
    req: p.AnthropicRequest, *, job_id: str, session_header: str | None = None, places: dict[str, str] | None = None
) -> dict[str, Any]:
    """The plain request `validate_submit` checks, for a messages request; `places` as in `messages_of`."""
    messages = messages_of(req, places)
    tools = [{"name": t.name, "description": t.description, "parameters": t.input_schema} for t in req.tools or ()]
    choice = req.tool_choice
    if choice is not None and choice.type == "none":
        tools = []
    elif choice is not None and choice.type == "tool":
        tools = [t for t in tools if t["name"] == choice.name]
        if not tools:
            raise InvalidArgument("tool_choice.name", f"names no tool in tools: {choice.name!r}")
    if req.session_id:
        session = req.session_id
    elif session_header:
        session = session_key(session_header)
    else:
        session = derive_session(req.model, messages, tools)
    settings = settings_from_extra(req.model_extra, max_new_tokens=req.max_tokens)
    generation = {"messages": messages, "tools": tools, "settings": settings, "session_id": session}
    return {"model": req.model, "job_id": job_id, "generation": generation}


def anthropic_param(field: str, places: Mapping[str, str] | None = None) -> str:
    """A `validate_submit` field path as the body's name for it; `places` names each image's block."""
    if field == "job_id":
        return "Idempotency-Key"
    for domain, body in (places or {}).items():
        if field == f"generation.{domain}" or field.startswith(f"generation.{domain}."):
            return body
    if field.endswith("settings.max_new_tokens"):
        return "max_tokens"
    return field.removeprefix("generation.settings.").removeprefix("generation.")


class MessageTurn:
    """One messages request's job, read back as Anthropic answers it."""

    def __init__(self, req: p.AnthropicRequest, spec: JobSpec, markers: Iterable[str]) -> None:
        self.req = req
        self.spec = spec
        self.id = f"msg_{spec.job_id}"
        self._stops = list(req.stop_sequences or ())
        self._markers = tuple(markers)

    def _tool_id(self, index: int) -> str:
        return "toolu_" + hashlib.blake2s(f"{self.spec.job_id}:{index}".encode(), digest_size=12).hexdigest()

    def _end(self, done: Completed, cut: TextCut) -> tuple[str, str | None, dict[str, int]]:
        stop = "tool_use" if done.tool_calls else ("stop_sequence" if cut.stopped_by else None)
        usage = {
            "input_tokens": done.usage.prompt_tokens,
            "output_tokens": done.usage.completion_tokens,
            "cache_read_input_tokens": max(0, done.usage.prompt_tokens - done.usage.prefilled_tokens),
        }
        return stop or _STOP.get(done.stop_reason, "end_turn"), cut.stopped_by, usage

    async def message(self, events: AsyncIterator[Event]) -> dict[str, Any]:
        """The whole message, once the job has ended."""
        final = [e async for e in events][-1]
        done = completed_of(self.spec.job_id, final)
        cut = TextCut(self._stops, () if self.spec.tools else self._markers)
        content: list[dict[str, Any]] = []
        if text := cut.whole(done.text):
            content.append({"type": "text", "text": text})
        for i, c in enumerate(done.tool_calls or ()):
            content.append({"type": "tool_use", "id": self._tool_id(i), "name": c.name, "input": dict(c.arguments)})
        stop_reason, stop_sequence, usage = self._end(done, cut)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.spec.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    async def events(self, source: AsyncIterator[Event]) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
        """Anthropic's stream: text deltas from each committed canvas, `tool_use` blocks at the end."""
        cut = TextCut(self._stops, self._markers)
        start = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.spec.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        yield "message_start", {"type": "message_start", "message": start}
        blocks = 0
        text_open = False
        async for event in source:
            if event.type == EventType.CANVAS or event.is_final:
                done = completed_of(self.spec.job_id, event) if event.is_final else None
                text = cut.feed(event.data.get("text", "")) if done is None else cut.flush()
                if text and not text_open:
                    text_open = True
                    yield (
                        "content_block_start",
                        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    )
                    blocks = 1
                if text:
                    yield (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                    )
                if done is None:
                    continue
                if text_open:
                    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
                for i, c in enumerate(done.tool_calls or ()):
                    index = blocks + i
                    block = {"type": "tool_use", "id": self._tool_id(i), "name": c.name, "input": {}}
                    yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
                    delta = {"type": "input_json_delta", "partial_json": json.dumps(dict(c.arguments))}
                    yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                    yield "content_block_stop", {"type": "content_block_stop", "index": index}
                stop_reason, stop_sequence, usage = self._end(done, cut)
                yield (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "usage": usage,
                        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    },
                )
                yield "message_stop", {"type": "message_stop"}
