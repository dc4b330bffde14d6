"""Test doubles for agent tasks: a scripted model that plays back turns you write.

model = ScriptedModel([call("calculator", expression="2+2"), "The answer is 4."])
result = AgentLoop(model, registry).run(AgentTask.from_instructions("2+2?", tools=("calculator",)))
assert model.requests[1][-1]["content"] == {"result": 4}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from blockpress.agents.model import AgentModel, Message, TurnChunk
from blockpress.agents.toolcalls import ToolCall, render_call

__all__ = ["ScriptedModel", "call"]

Turn = str | Callable[[Sequence[Message]], str]


def call(name: str, /, **arguments: Any) -> str:
    """The text of a model turn that calls `name` with `arguments`, in the checkpoint's format."""
    return render_call(ToolCall(name, arguments)) + "<turn|>"


class ScriptedModel(AgentModel):
    """Plays back one scripted turn per request, cut into canvases of `canvas_chars` characters.

    A turn is a string or a function of the conversation (to answer with what a tool returned).
    Every request's messages and tools are kept in `requests` and `tools_seen` for assertions;
    `canvases_generated` counts canvases actually produced, so a test can check that generation
    stopped at the canvas that completed a tool call.
    """

    def __init__(self, turns: Sequence[Turn], *, canvas_chars: int = 16, tokens_per_canvas: int | None = None):
        self._turns = list(turns)
        self._canvas_chars = canvas_chars
        self._tokens_per_canvas = tokens_per_canvas or canvas_chars
        self.requests: list[list[Message]] = []
        self.tools_seen: list[list[str]] = []
        self.canvases_generated = 0

    def stream_turn(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int | None = None,
    ) -> Iterator[TurnChunk]:
        self.requests.append([dict(m) for m in messages])
        self.tools_seen.append([t["function"]["name"] for t in tools])
        if not self._turns:
            raise AssertionError("ScriptedModel ran out of scripted turns")
        turn = self._turns.pop(0)
        text = turn(messages) if callable(turn) else turn
        return self._canvases(text, max_new_tokens)

    def _canvases(self, text: str, max_new_tokens: int | None) -> Iterator[TurnChunk]:
        spent = 0
        for start in range(0, max(len(text), 1), self._canvas_chars):
            if max_new_tokens is not None and spent >= max_new_tokens:
                return
            self.canvases_generated += 1
            spent += self._tokens_per_canvas
            yield TurnChunk(text[start : start + self._canvas_chars], self._tokens_per_canvas)
