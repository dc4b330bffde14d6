"""The `AgentModel` backed by an `Engine`, with the conversation's KV cache kept warm.

Each turn renders the whole conversation with the checkpoint's chat template and hands it to the
engine with one `EngineSession`: the session holds the previous prompt (and every canvas but the
last), so a turn encodes only the tokens added since. The turn streams committed canvases and is
closed by the loop at the first canvas that completes a tool call.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blockpress.agents.model import AgentModel, Message, TurnChunk
from blockpress.agents.toolcalls import CALL_OPEN
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.workers.protocol import Engine
from blockpress.workers.types import CanvasEvent

__all__ = ["EngineModel", "TurnStats", "pin_tool_call_skeleton"]

TemplatePolicy = Callable[[Sequence[Message], Sequence[Mapping[str, Any]]], "str | None"]
"""Given the conversation and the tools, the text to pin at the start of the turn, or None."""


@dataclass(frozen=True)
class TurnStats:
    """What one turn cost the engine; `reused_tokens` of the prompt came from the session's cache."""

    prompt_tokens: int
    reused_tokens: int
    first_canvas_s: float
    canvases: int
    steps: int
    """Denoising steps over the turn's canvases."""
    pinned_tokens: int


def pin_tool_call_skeleton(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]) -> str | None:
    """Pins ``<|tool_call>call:NAME{`` on a task's first turn when exactly one tool is offered.

    The model then only fills the arguments. It forces a call, so it suits tasks that need their
    tool; later turns (after a tool result) are left free to answer.
    """
    if len(tools) != 1 or any(m.get("role") == "tool" for m in messages):
        return None
    return f"{CALL_OPEN}call:{tools[0]['function']['name']}{{"


class EngineModel(AgentModel):
    """Generates turns with `engine`, one conversation per instance (it owns one session).

    Args:
        engine: the replica's engine; not thread-safe, so one task at a time.
        settings: denoising settings of the job; a turn's token limit is the smaller of theirs and
            the task's remaining budget.
        cancel: passed to the engine, which checks it before every denoising step.
        pin: chooses text to pin at the start of a turn (see `pin_tool_call_skeleton`).
        on_canvas: called with every committed `CanvasEvent` (the runner streams them as job events).
        reuse_session: keep the KV cache across turns (the point of this class); False re-prefills
            the whole conversation every turn, which only a benchmark wants.
    """

    def __init__(
        self,
        engine: Engine,
        settings: DenoiseSettings | None = None,
        *,
        cancel: Callable[[], bool] | threading.Event | None = None,
        pin: TemplatePolicy | None = None,
        on_canvas: Callable[[CanvasEvent], None] | None = None,
        reuse_session: bool = True,
    ) -> None:
        self._engine = engine
        self._settings = engine.resolve(settings)
        self._cancel = cancel
        self._pin = pin
        self._on_canvas = on_canvas
        self._session = engine.new_session()
        self._reuse = reuse_session
        self.stats: list[TurnStats] = []

    def stream_turn(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int | None = None,
    ) -> Iterator[TurnChunk]:
        prompt = self._engine.apply_chat_template([dict(m) for m in messages], tools=list(tools) or None)
        settings = self._settings
        if max_new_tokens is not None and settings.max_new_tokens is not None:
            cap = min(settings.max_new_tokens, max_new_tokens)
            settings = dataclasses.replace(settings, max_new_tokens=cap)
        pinned = self._pin(messages, tools) if self._pin else None
        template = self._tokens(pinned) if pinned else None
        if not self._reuse:
            self._session = self._engine.new_session()
        cached = self._session.token_ids
        reused = len(cached) if prompt[: len(cached)] == cached else 0
        started = time.perf_counter()
        first_canvas_s, canvases, steps = 0.0, 0, 0
        events = self._engine.stream(prompt, settings, cancel=self._cancel, session=self._session, template=template)
        try:
            for event in events:
                if not isinstance(event, CanvasEvent):
                    continue
                canvases += 1
                steps += event.stats.steps
                if canvases == 1:
                    first_canvas_s = time.perf_counter() - started
                if self._on_canvas is not None:
                    self._on_canvas(event)
                yield TurnChunk(event.text, len(event.token_ids))
        finally:
            events.close()  # stops the engine between canvases when the loop has its tool call
            self.stats.append(TurnStats(len(prompt), reused, first_canvas_s, canvases, steps, len(template or ())))

    def _tokens(self, text: str) -> list[int | None]:
        return list(self._engine.tokenizer(text, add_special_tokens=False)["input_ids"])
