"""What the adapters share: OpenAI-style chat messages (as frameworks write them) to the SDK's messages."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

from blockpress.runtime.contracts.errors import InvalidArgument

__all__ = ["to_sdk_messages"]


def _images(content: Any) -> list[bytes]:
    """The bytes of a message's `image_url` parts with base64 data URLs (the gateway fetches no URL)."""
    if content is None or isinstance(content, str):
        return []
    out = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in ("image_url", "input_image"):
            continue
        url = part.get("image_url", "")
        url = url.get("url", "") if isinstance(url, Mapping) else str(url)
        head, _, data = url.partition(",")
        if not head.startswith("data:") or ";base64" not in head:
            raise InvalidArgument("messages", "images must be base64 data URLs (data:image/png;base64,...)")
        out.append(base64.b64decode(data))
    return out


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")]
    return "\n".join(parts)


def to_sdk_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat-completions messages as the SDK's: a tool message gets the name of the call it answers, and
    tool-call arguments become mappings; leading system (or developer) messages merge into one; a user
    message's image parts (base64 data URLs) become its `images`, checked by the gateway."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for m in messages:
        role = m.get("role", "user")
        text = _text(m.get("content"))
        if role in ("system", "developer"):
            if out and out[-1]["role"] == "system":
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": "system", "content": text})
        elif role == "assistant":
            calls = []
            for call in m.get("tool_calls") or ():
                fn = call.get("function", call)
                args = fn.get("arguments") or {}
                calls.append({"name": fn["name"], "arguments": json.loads(args) if isinstance(args, str) else args})
                names[call.get("id", "")] = fn["name"]
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""), "tool")
            out.append({"role": "tool", "name": name, "content": text})
        else:
            images = _images(m.get("content"))
            out.append({"role": "user", "content": text, **({"images": images} if images else {})})
    return out
