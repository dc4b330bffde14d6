"""The seam between the agent loop and whatever generates a model turn."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AgentModel", "Message", "TurnChunk"]

Message = Mapping[str, Any]
"""A chat message as the chat template takes it: role, content, and tool_calls or name."""


@dataclass(frozen=True)
class TurnChunk:
    """Text one committed canvas added to the turn, and how many new tokens it cost."""

    text: str
    tokens: int


class AgentModel(ABC):
    """Generates one model turn of a conversation, canvas by canvas."""

    @abstractmethod
    def stream_turn(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int | None = None,
    ) -> Iterator[TurnChunk]:
        """Yields the next model turn's text as it is committed.

        Args:
            messages: the conversation so far; the turn to generate is the model's.
            tools: OpenAI-style declarations of the tools the model may call.
            max_new_tokens: an upper bound for this turn (the task's remaining budget), or None.

        The caller closes the iterator as soon as the text holds a complete tool call, so an
        implementation should generate lazily and release its resources in `finally`.
        """
