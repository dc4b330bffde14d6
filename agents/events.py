"""What an agent task reports while it runs: one dataclass per event kind of the job's stream."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["AgentEvent", "FinalAnswer", "TaskStopped", "ToolCalled", "ToolReturned", "TurnStarted"]


@dataclass(frozen=True)
class AgentEvent:
    kind: ClassVar[str]
    turn: int

    def to_mapping(self) -> dict[str, Any]:
        """The event as the job's event stream stores it: `kind` plus the fields."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class TurnStarted(AgentEvent):
    kind: ClassVar[str] = "turn"


@dataclass(frozen=True)
class ToolCalled(AgentEvent):
    kind: ClassVar[str] = "tool_call"
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolReturned(AgentEvent):
    """A tool's result, cut for the stream; the whole result stays in the turn record."""

    kind: ClassVar[str] = "tool_result"
    name: str
    ok: bool
    content: str
    truncated: bool


@dataclass(frozen=True)
class FinalAnswer(AgentEvent):
    kind: ClassVar[str] = "final_answer"
    text: str


@dataclass(frozen=True)
class TaskStopped(AgentEvent):
    """The task ended without a final answer; `reason` is `AgentStopped.reason`."""

    kind: ClassVar[str] = "stopped"
    reason: str
    message: str
