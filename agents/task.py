"""What a caller asks of the agent loop, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockpress.agents.errors import AgentStopped, InvalidAgentTask
from blockpress.agents.ledger import TurnRecord
from blockpress.agents.model import Message

__all__ = ["AgentResult", "AgentTask"]


@dataclass(frozen=True, kw_only=True)
class AgentTask:
    """What the caller asked for. Budgets of None are unlimited."""

    messages: tuple[Message, ...]
    """The conversation to continue; usually one user message with the task."""
    tools: tuple[str, ...] = ()
    """Names of the registry's tools this task may call; nothing else can be called."""
    max_turns: int = 8
    """Model turns (each with at most one tool call) before the task stops with "max_turns"."""
    max_new_tokens: int | None = None
    """New tokens over all turns."""
    max_seconds: float | None = None
    """Wall-clock time of this attempt."""

    def __post_init__(self) -> None:
        if not self.messages:
            raise InvalidAgentTask("messages", "the task needs at least one message")
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise InvalidAgentTask("max_turns", f"must be a positive integer, got {self.max_turns!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidAgentTask("max_new_tokens", f"must be positive, got {self.max_new_tokens!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise InvalidAgentTask("max_seconds", f"must be positive, got {self.max_seconds!r}")

    @classmethod
    def from_instructions(cls, instructions: str, **fields: Any) -> AgentTask:
        """A task from one user message."""
        return cls(messages=({"role": "user", "content": instructions},), **fields)


@dataclass(frozen=True)
class AgentResult:
    """How a task ended: its answer (or last text), the reason, and every turn's record."""

    text: str
    stop_reason: str
    """"final_answer", or the `reason` of `error`."""
    turns: tuple[TurnRecord, ...]
    tokens: int
    error: AgentStopped | None = None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [t.call for t in self.turns if t.call is not None]
