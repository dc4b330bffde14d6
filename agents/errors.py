"""Errors raised by the agent layer, sorted by who must act.

    AgentError
    ├── InvalidAgentTask(ValueError)  the caller sent a bad task: unknown tool, bad limit (INVALID_ARGUMENT)
    ├── ToolConfigError               the operator (or a tool's author) set something up wrong
    ├── ToolCallError                 the model misbehaved; the loop reports it back to the model
    │   ├── MalformedToolCall         the tool-call text does not parse
    │   ├── UnknownTool               the call names a tool outside the task's list
    │   └── InvalidToolArguments      the arguments do not match the tool's JSON schema
    ├── ToolFailed                    the tool ran and failed, hung or hit a sandbox limit
    ├── AgentStopped                  the task ended without a final answer
    │   ├── MaxTurnsExceeded
    │   └── BudgetExceeded            a new-token or wall-clock budget ran out; names which
    └── Superseded                    this worker lost the job to a newer attempt and must stop

`ToolCallError` and `ToolFailed` never escape the loop: they become error results the model sees.
`AgentStopped` is what a task's result carries when it ends early. The gateway maps these to gRPC
status codes in one place (`blockpress.runtime.contracts.errors`).
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AgentStopped",
    "BudgetExceeded",
    "InvalidAgentTask",
    "InvalidToolArguments",
    "MalformedToolCall",
    "MaxTurnsExceeded",
    "Superseded",
    "ToolCallError",
    "ToolConfigError",
    "ToolFailed",
    "UnknownTool",
]


class AgentError(Exception):
    """Base class of everything the agent layer raises on purpose."""


class InvalidAgentTask(AgentError, ValueError):
    """The caller's task cannot run: names the field and the reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ToolConfigError(AgentError):
    """A tool cannot be registered or loaded (bad signature, broken entry point, missing setting)."""


class ToolCallError(AgentError):
    """The model produced a tool call the loop will not run; the message goes back to the model."""

    def __init__(self, message: str, *, tool_name: str | None = None) -> None:
        super().__init__(message)
        self.tool_name = tool_name


class MalformedToolCall(ToolCallError):
    """The model's tool-call text is not in the checkpoint's format."""


class UnknownTool(ToolCallError):
    """The model called a tool the task does not allow (or that does not exist)."""


class InvalidToolArguments(ToolCallError):
    """The arguments do not match the tool's JSON schema; `path` points at the bad value."""

    def __init__(self, message: str, *, tool_name: str | None = None, path: str = "") -> None:
        super().__init__(message, tool_name=tool_name)
        self.path = path


class ToolFailed(AgentError):
    """The tool ran and failed. Tools raise this to give the model a clean error message."""


class AgentStopped(AgentError):
    """The task ended before a final answer; `reason` is a short machine-readable word."""

    reason = "stopped"


class MaxTurnsExceeded(AgentStopped):
    """The task used all its turns without a final answer."""

    reason = "max_turns"


class BudgetExceeded(AgentStopped):
    """A budget ran out; `reason` is `"max_new_tokens"` or `"max_seconds"`."""

    def __init__(self, budget: str, message: str) -> None:
        super().__init__(message)
        self.reason = budget


class Superseded(AgentError):
    """The job's ledger belongs to a newer attempt; this attempt stops before running anything more."""
