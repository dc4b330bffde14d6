"""OpenAI's chat completions over BlockPress jobs: a request body in, a completion or its chunks out.

`submit_body` turns a `ChatCompletionRequest` into the plain request `validate_submit` checks (the
gRPC edge's `request_to_dict` builds the same), so both edges run one validation; `ChatTurn` turns the
job's events into a `ChatCompletion` or a stream of `ChatCompletionChunk`s.

The mapping, where OpenAI and BlockPress differ:
- `max_completion_tokens` (or `max_tokens`) is `max_new_tokens`, `seed` is `seed`; the denoising settings
  ride as extra body fields. `temperature` and `top_p` are ignored: the denoiser's temperature is the
  schedule from `t_max` to `t_min`.
- A `tool` message answers the assistant call whose id it names; it becomes the chat template's tool
  message with that call's tool name. `tool_choice` "none" sends no tools, a named function sends only
  that one; "required" cannot force a call on a diffusion canvas and reads as "auto".
- `image_url` parts of a user message, as data URLs (the gateway fetches nothing), become its `images`,
  placed before its text; the gateway checks them as it checks images over gRPC.
- `stop` strings cut the text at the edge; the job itself ends at a stop token or the token limit.
- Tool call ids are derived from the job id, so a request retried with its `Idempotency-Key` gets the
  same ids back. `usage.prompt_tokens_details.cached_tokens` counts prompt tokens a warm session saved.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.contracts.events import Completed, from_data
from blockpress.runtime.contracts.jobs import Event, EventType, JobSpec
from blockpress.runtime.http import protocol as p
from blockpress.runtime.http.jobs import TextCut, derive_session, session_key, settings_from_extra
from blockpress.runtime.sdk.results import outcome

__all__ = [
    "ChatTurn",
    "completed_of",
    "decode_base64",
    "finish_reason",
    "image_data",
    "openai_param",
    "submit_body",
    "text_of",
    "tool_call_id",
    "usage_of",
]

_FINISH = {"tool_call": "tool_calls", "max_new_tokens": "length"}


def text_of(content: str | list[Any] | None, where: str) -> str:
    """A message's text; its image parts are read by `images_of`."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content if isinstance(part, p.TextPart))


_DATA_URL = re.compile(r"\Adata:([\w.+/-]*)((?:;[^;,]*)*),(.*)\Z", re.DOTALL)


def image_data(url: str, where: str) -> dict[str, Any]:
    """An image's bytes and MIME type from a `data:` URL (the gateway fetches no other URL)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidArgument(
            where, "send the image inline as a data URL (data:image/png;base64,...); URLs are not fetched"
        )
    if ";base64" not in match.group(2):
        raise InvalidArgument(where, "the data URL must be base64 (data:image/png;base64,...)")
    return {"data": decode_base64(match.group(3), where), "mime_type": match.group(1)}


def decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(where, f"is not valid base64 ({exc})") from None


def images_of(
    content: str | list[Any] | None, where: str, role: str, place: tuple[int, dict[str, str]]
) -> list[dict[str, Any]]:
    """A message's images (`image_url` parts with data URLs), in order; `place` records, for an error
    about the domain's `messages[d].images[j]`, the body's name for that part."""
    if content is None or isinstance(content, str):
        return []
    out: list[dict[str, Any]] = []
    for k, part in enumerate(content):
        if not isinstance(part, p.ImagePart):
            continue
        field = f"{where}.content[{k}].image_url.url"
        if role != "user":
            raise InvalidArgument(f"{where}.content[{k}]", f"images go in user messages, not in a {role!r} message")
        place[1][f"messages[{place[0]}].images[{len(out)}]"] = field
        out.append(image_data(part.image_url.url, field))
    return out


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(where, f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(where, f"must be a JSON object, got {type(value).__name__}")
    return value


def messages_of(messages: Iterable[p.ChatMessage], places: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """OpenAI messages as the domain's chat messages (`{"role", "content", "name", "tool_calls", "images"}`);
    `places` gets the body's name of each image (see `openai_param`)."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> tool name, from the assistant messages so far
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text = text_of(m.content, where)
        images = images_of(m.content, where, m.role, (len(out), places if places is not None else {}))
        if m.role in ("system", "developer"):
            if out and out[-1]["role"] == "system":  # the template takes one system turn: merge
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": "system", "content": text})
        elif m.role == "assistant":
            calls = []
            for j, call in enumerate(m.tool_calls or ()):
                args = _arguments(call.function.arguments, f"{where}.tool_calls[{j}].function.arguments")
                calls.append({"name": call.function.name, "arguments": args})
                names[call.id] = call.function.name
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif m.role == "tool":
            name = m.name or names.get(m.tool_call_id or "")
            if not name:
                raise InvalidArgument(
                    f"{where}.tool_call_id", f"{m.tool_call_id!r} answers no tool call of an earlier assistant message"
                )
            out.append({"role": "tool", "content": text, "name": name})
        else:
            out.append({"role": "user", "content": text, **({"images": images} if images else {})})
    return out


def tools_of(req: p.ChatCompletionRequest) -> list[dict[str, Any]]:
    """The tool definitions to render, after `tool_choice`."""
    tools = [
        {"name": t.function.name, "description": t.function.description, "parameters": t.function.parameters}
        for t in req.tools or ()
    ]
    choice = req.tool_choice
    if choice == "none":
        return []
    if isinstance(choice, p.NamedToolChoice):
        chosen = [t for t in tools if t["name"] == choice.function.name]
        if not chosen:
            raise InvalidArgument("tool_choice.function.name", f"names no tool in tools: {choice.function.name!r}")
        return chosen
    return tools


def submit_body(
    req: p.ChatCompletionRequest,
    *,
    job_id: str,
    session_header: str | None = None,
    places: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The plain request `validate_submit` checks, for a chat completion; `places` as in `messages_of`."""
    messages = messages_of(req.messages, places)
    tools = tools_of(req)
    if req.session_id:
        session = req.session_id
    elif req.prompt_cache_key or session_header:
        session = session_key(req.prompt_cache_key or session_header or "")
    else:
        session = derive_session(req.model, messages, tools)
    max_new = req.max_completion_tokens or req.max_tokens
    generation = {
        "messages": messages,
        "tools": tools,
        "settings": settings_from_extra(req.model_extra, max_new_tokens=max_new, seed=req.seed),
        "drafts": req.drafts,
        "session_id": session,
    }
    return {"model": req.model, "job_id": job_id, "generation": generation}


_SETTING = re.compile(r"^(generation|agent)\.settings\.")


def openai_param(field: str, places: Mapping[str, str] | None = None) -> str:
    """A `validate_submit` field path as the body's parameter (`generation.settings.t_min` -> `t_min`);
    `places` names the body's part of each image (`messages[0].images[0]` -> `messages[0].content[1]...`)."""
    if field == "job_id":
        return "Idempotency-Key"
    for domain, body in (places or {}).items():
        if field == f"generation.{domain}" or field.startswith(f"generation.{domain}."):
            return body
    if field.endswith("settings.max_new_tokens"):
        return "max_completion_tokens"
    field = _SETTING.sub("", field)
    field = re.sub(r"^generation\.tools\[(\d+)\]\.", r"tools[\1].function.", field)
    return field.removeprefix("generation.")


def tool_call_id(job_id: str, index: int) -> str:
    """The id of a job's `index`th tool call: the same on every replay of the job."""
    return "call_" + hashlib.blake2s(f"{job_id}:{index}".encode(), digest_size=12).hexdigest()


def usage_of(done: Completed) -> p.UsageOut:
    u = done.usage
    cached = max(0, u.prompt_tokens - u.prefilled_tokens)
    return p.UsageOut(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
    )


def finish_reason(done: Completed, cut: TextCut) -> p.FinishReason:
    if done.tool_calls:
        return "tool_calls"
    if cut.stopped_by is not None:
        return "stop"
    return _FINISH.get(done.stop_reason, "stop")  # type: ignore[return-value]


def completed_of(job_id: str, event: Event) -> Completed:
    """The `completed` payload of a final event, or the `JobError` the job ended in."""
    outcome(job_id, event)  # raises for failed, cancelled, expired and dead-lettered jobs
    payload = from_data(event.type, event.data)
    assert isinstance(payload, Completed)
    return payload


class ChatTurn:
    """One chat completion's job, read back as OpenAI answers it.

    Args:
        req: the request.
        spec: the job it became.
        markers: the model tokenizer's special tokens, where the visible text of a turn ends.
    """

    def __init__(self, req: p.ChatCompletionRequest, spec: JobSpec, markers: Iterable[str]) -> None:
        self.req = req
        self.spec = spec
        self.id = f"chatcmpl-{spec.job_id}"
        self.created = int(spec.submitted_at or time.time())
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
        self._stops = stops
        self._markers = tuple(markers)

    async def completion(self, events: AsyncIterator[Event]) -> p.ChatCompletion:
        """The whole answer, once the job has ended."""
        final = None
        async for event in events:
            final = event
        assert final is not None and final.is_final
        done = completed_of(self.spec.job_id, final)
        # With tools the worker already split the turn into its text and its call; a malformed call
        # comes back as the raw turn, markers and all, for the framework to show or retry.
        cut = TextCut(self._stops, () if self.spec.tools else self._markers)
        text = cut.whole(done.text)
        calls = [self._call(i, c.name, c.arguments) for i, c in enumerate(done.tool_calls or ())]
        message = p.AssistantMessage(content=text if text or not calls else None, tool_calls=calls or None)
        choice = p.Choice(message=message, finish_reason=finish_reason(done, cut))
        return p.ChatCompletion(
            id=self.id, created=self.created, model=self.spec.model, choices=[choice], usage=usage_of(done)
        )

    async def chunks(self, events: AsyncIterator[Event]) -> AsyncIterator[p.ChatCompletionChunk]:
        """The answer as it streams: content from each committed canvas, tool calls at the end."""
        cut = TextCut(self._stops, self._markers)
        yield self._chunk(p.Delta(role="assistant", content=""))
        async for event in events:
            if event.type == EventType.CANVAS:
                if text := cut.feed(event.data.get("text", "")):
                    yield self._chunk(p.Delta(content=text))
            elif event.type == EventType.DRAFT and self.spec.drafts:
                yield p.ChatCompletionChunk(
                    id=self.id,
                    created=self.created,
                    model=self.spec.model,
                    choices=[],
                    blockpress={"draft": dict(event.data)},
                )
            elif event.is_final:
                done = completed_of(self.spec.job_id, event)
                if tail := cut.flush():
                    yield self._chunk(p.Delta(content=tail))
                for i, c in enumerate(done.tool_calls or ()):
                    call = self._call(i, c.name, c.arguments)
                    fn = p.FunctionDelta(name=call.function.name, arguments=call.function.arguments)
                    yield self._chunk(
                        p.Delta(tool_calls=[p.ToolCallDelta(index=i, id=call.id, type="function", function=fn)])
                    )
                yield self._chunk(p.Delta(), finish=finish_reason(done, cut))
                options = self.req.stream_options
                if options is not None and options.include_usage:
                    yield p.ChatCompletionChunk(
                        id=self.id, created=self.created, model=self.spec.model, choices=[], usage=usage_of(done)
                    )

    def _chunk(self, delta: p.Delta, finish: p.FinishReason | None = None) -> p.ChatCompletionChunk:
        choice = p.ChunkChoice(delta=delta, finish_reason=finish)
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.spec.model, choices=[choice])

    def _call(self, index: int, name: str, arguments: Mapping[str, Any]) -> p.ToolCallOut:
        args = json.dumps(dict(arguments), separators=(",", ":"))
        return p.ToolCallOut(
            id=tool_call_id(self.spec.job_id, index), function=p.FunctionCallOut(name=name, arguments=args)
        )
