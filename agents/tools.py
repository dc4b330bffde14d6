"""Tools: a name, a description, a JSON schema derived from a typed function, and a registry.

A replica builds one `ToolRegistry` at start (built-ins plus the `blockpress.tools` entry-point
group); each task names the subset it may use, and `ToolRegistry.invoke` refuses everything else.

Every call is bounded in time and memory from outside the tool: a tool runs in a child process
killed at its budget (`blockpress.agents.isolation`), unless it says it isolates itself
(`isolated=False`, like the python sandbox), and then it must honor `isolation.current_budget()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from blockpress.agents.errors import InvalidAgentTask, ToolCallError, ToolConfigError, ToolFailed, UnknownTool
from blockpress.agents.isolation import Budget, ToolLimits, call_isolated, tool_budget
from blockpress.agents.schema import docstring_parts, schema_for, validate
from blockpress.agents.toolcalls import ToolCall

__all__ = ["ENTRY_POINT_GROUP", "Tool", "ToolRegistry", "ToolResult", "tool"]

ENTRY_POINT_GROUP = "blockpress.tools"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tool:
    """A function the model may call. Build one with `Tool.from_function` or the `@tool` decorator."""

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the keyword arguments."""
    fn: Callable[..., Any] = field(repr=False, compare=False)
    isolated: bool = True
    """Run each call in a child process killed at the budget. False only for a tool that runs its
    work in a bounded process of its own and stops at `isolation.current_budget()`."""

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        isolated: bool = True,
    ) -> Tool:
        """A tool from a typed function; the description defaults to the docstring's summary."""
        summary, _ = docstring_parts(fn)
        tool_name = name or fn.__name__
        if not tool_name.isidentifier():
            raise ToolConfigError(f"tool name {tool_name!r} must be an identifier")
        return cls(tool_name, description or summary, schema_for(fn), fn, isolated)

    def declaration(self) -> dict[str, Any]:
        """The OpenAI-style declaration that the chat template's `tools` argument takes."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, isolated: bool = True) -> Any:
    """Decorator: ``@tool`` or ``@tool(name="...", isolated=False)`` turns a typed function into a `Tool`.

    `isolated=False` runs the function in the replica's own process, where its side effects land
    and where nothing bounds it: only for a tool that bounds its own time and memory.
    """
    if fn is None:
        return lambda f: Tool.from_function(f, name=name, isolated=isolated)
    return Tool.from_function(fn, name=name, isolated=isolated)


@dataclass(frozen=True)
class ToolResult:
    """What a call returned: `value` on success, `error` otherwise. Never both."""

    name: str
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def content(self) -> dict[str, Any]:
        """The tool message's content, as the chat template renders it."""
        return {"result": self.value} if self.ok else {"error": self.error}


class ToolRegistry:
    """The tools a replica knows, by name.

    Args:
        tools: the tools to register.
        limits: the time and memory each isolated call may use (the task's budget may cut time).
    """

    def __init__(self, tools: Iterable[Tool] = (), *, limits: ToolLimits | None = None) -> None:
        self.limits = limits or ToolLimits()
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, item: Tool | Callable[..., Any]) -> Tool:
        """Adds a tool (or a typed function); a second tool with the same name is an error."""
        new = item if isinstance(item, Tool) else Tool.from_function(item)
        if new.name in self._tools:
            raise ToolConfigError(f"a tool named {new.name!r} is already registered")
        self._tools[new.name] = new
        return new

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Registers every tool of the entry-point group; returns their names.

        Raises:
            ToolConfigError: an entry point fails to import or is not a tool or typed function.
        """
        names = []
        for ep in entry_points(group=group):
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin is the operator's to fix, with its name
                raise ToolConfigError(f"entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            if not isinstance(loaded, Tool):
                loaded = Tool.from_function(loaded, name=ep.name)
            names.append(self.register(loaded).name)
        return names

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            raise UnknownTool(f"no tool named {name!r}", tool_name=name)
        return self._tools[name]

    def select(self, names: Collection[str]) -> list[Tool]:
        """The tools a task asked for, in its order.

        Raises:
            InvalidAgentTask: a name this registry does not know.
        """
        unknown = [n for n in names if n not in self._tools]
        if unknown:
            raise InvalidAgentTask("tools", f"unknown tool {unknown[0]!r}; known tools: {', '.join(self.names())}")
        return [self._tools[n] for n in names]

    def invoke(self, call: ToolCall, allowed: Collection[str], *, budget: Budget | None = None) -> ToolResult:
        """Runs `call` if `allowed` lists its tool and its arguments validate; never raises.

        The allow-list is checked on every call, so nothing a tool returns (and the model then
        repeats) can reach a tool the task did not grant. `budget` (the task's time left and its
        cancel flag) stops the call early; without one the registry's `limits` alone bound it.
        """
        try:
            if call.name not in allowed:
                raise UnknownTool(
                    f"tool {call.name!r} is not available; available tools: {', '.join(allowed) or 'none'}",
                    tool_name=call.name,
                )
            target = self.get(call.name)
            validate(target.parameters, call.arguments, tool=call.name)
            if budget is None:
                budget = Budget(time.monotonic() + self.limits.wall_seconds, lambda: False)
            if not target.isolated:
                with tool_budget(budget):
                    return ToolResult(call.name, value=target.fn(**call.arguments))
            value = call_isolated(target.fn, dict(call.arguments), limits=self.limits, budget=budget)
            return ToolResult(call.name, value=value)
        except (ToolCallError, ToolFailed) as exc:
            return ToolResult(call.name, error=str(exc))
        except Exception as exc:  # a buggy tool must not take the replica down; the model sees why
            _log.warning("tool %s raised %s", call.name, type(exc).__name__, exc_info=True)
            return ToolResult(call.name, error=f"{type(exc).__name__}: {exc}")
