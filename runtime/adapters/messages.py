"""What the adapters share: OpenAI-style chat messages (as frameworks write them) to the SDK's messages."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["to_sdk_messages"]


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")]
    return "\n".join(parts)


def to_sdk_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat-completions messages as the SDK's: a tool message gets the name of the call it answers, and
    tool-call arguments become mappings; leading system (or developer) messages merge into one."""
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
            out.append({"role": "user", "content": text})
    return out
