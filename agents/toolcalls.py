"""Gemma 4 tool calls, the format DiffusionGemma's chat template uses.

A call reads ``<|tool_call>call:NAME{key:value,...}<tool_call|>``. Strings are wrapped in the
``<|"|>`` token, numbers and booleans are bare, objects are ``{k:v}`` and lists ``[a,b]``. The
parser is a small recursive descent over exactly that grammar: anything else is the model's
mistake and raises `MalformedToolCall`, which the loop hands back to the model as an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blockpress.agents.errors import MalformedToolCall

__all__ = ["ToolCall", "has_complete_call", "neutralize", "parse_turn", "render_call", "render_value"]

CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
# Every special marker of the format; tool output must never smuggle one into the prompt.
_MARKERS = (
    "<|turn>",
    "<turn|>",
    "<|tool>",
    "<tool|>",
    CALL_OPEN,
    CALL_CLOSE,
    "<|tool_response>",
    "<tool_response|>",
    QUOTE,
    "<bos>",
    "<eos>",
)
_END_MARKERS = ("<turn|>", "<eos>")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_MAX_DEPTH = 32


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and its arguments as plain JSON values."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


def render_value(value: Any) -> str:
    """Renders a JSON value in the Gemma 4 call syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot render {value!r}")
        return repr(value)
    if isinstance(value, str):
        return f"{QUOTE}{value}{QUOTE}"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    raise TypeError(f"cannot render a {type(value).__name__}")


def render_call(call: ToolCall) -> str:
    """The text a model emits for `call`, markers included."""
    return f"{CALL_OPEN}call:{call.name}{render_value(call.arguments)}{CALL_CLOSE}"


def has_complete_call(text: str) -> bool:
    """Whether streamed text already holds a whole call, so generation can stop."""
    start = text.find(CALL_OPEN)
    return start >= 0 and text.find(CALL_CLOSE, start + len(CALL_OPEN)) >= 0


def parse_turn(text: str) -> tuple[str, ToolCall | None]:
    """Splits a model turn into its visible text and its first tool call (None if it has none).

    Raises:
        MalformedToolCall: an opening marker without a parsable, closed call after it.
    """
    for marker in _END_MARKERS:
        cut = text.find(marker)
        if cut >= 0 and (text.find(CALL_OPEN) < 0 or cut < text.find(CALL_OPEN)):
            text = text[:cut]
    start = text.find(CALL_OPEN)
    if start < 0:
        return text.strip(), None
    end = text.find(CALL_CLOSE, start)
    if end < 0:
        raise MalformedToolCall("the tool call was not closed with <tool_call|>")
    body = text[start + len(CALL_OPEN) : end].strip()
    if not body.startswith("call:"):
        raise MalformedToolCall(f"a tool call must start with 'call:NAME', got {body[:40]!r}")
    match = _NAME.match(body, 5)
    if match is None:
        raise MalformedToolCall(f"no tool name after 'call:' in {body[:40]!r}")
    name = match.group()
    parser = _Parser(body, match.end())
    if parser.peek() != "{":
        raise MalformedToolCall(f"the arguments of {name!r} must be an object {{...}}", tool_name=name)
    try:
        arguments = parser.value(0)
        parser.skip_space()
        if parser.pos != len(body):
            raise parser.error("unexpected text after the arguments")
    except MalformedToolCall as exc:
        raise MalformedToolCall(f"{name}: {exc}", tool_name=name) from None
    return text[:start].strip(), ToolCall(name, arguments)


def neutralize(text: str) -> str:
    """Tool output is data: a zero-width space keeps markers in it from tokenizing as special tokens."""
    for marker in _MARKERS:
        if marker in text:
            text = text.replace(marker, marker[0] + "\u200b" + marker[1:])
    return text


class _Parser:
    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def error(self, what: str) -> MalformedToolCall:
        return MalformedToolCall(f"{what} at offset {self.pos}: {self.text[self.pos : self.pos + 20]!r}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos : self.pos + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {char!r}")
        self.pos += 1

    def value(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise self.error("arguments nested too deeply")
        char = self.peek()
        if self.text.startswith(QUOTE, self.pos):
            end = self.text.find(QUOTE, self.pos + len(QUOTE))
            if end < 0:
                raise self.error("unterminated string")
            out = self.text[self.pos + len(QUOTE) : end]
            self.pos = end + len(QUOTE)
            return out
        if char == "{":
            return self._object(depth)
        if char == "[":
            return self._list(depth)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, self.pos) and not self._ident_char(self.pos + len(word)):
                self.pos += len(word)
                return val
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise self.error("expected a value")
        self.pos = match.end()
        literal = match.group()
        return float(literal) if any(c in literal for c in ".eE") else int(literal)

    def _ident_char(self, pos: int) -> bool:
        return pos < len(self.text) and (self.text[pos].isalnum() or self.text[pos] == "_")

    def _object(self, depth: int) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            self.skip_space()
            if self.text.startswith(QUOTE, self.pos):
                key = self.value(depth + 1)
            else:
                match = _NAME.match(self.text, self.pos)
                if match is None:
                    raise self.error("expected a key")
                key, self.pos = match.group(), match.end()
            if key in out:
                raise self.error(f"duplicate key {key!r}")
            self.expect(":")
            out[key] = self.value(depth + 1)
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return out

    def _list(self, depth: int) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value(depth + 1))
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return out
