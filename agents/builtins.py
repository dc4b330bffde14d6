"""The built-in tools: `calculator`, `python` (sandboxed) and `http_get` (allow-listed hosts only)."""

from __future__ import annotations

from collections.abc import Collection
from importlib.metadata import entry_points
from typing import Any

from blockpress.agents.calculator import evaluate
from blockpress.agents.errors import ToolFailed
from blockpress.agents.httpget import http_get_tool
from blockpress.agents.sandbox import SandboxLimits, run_python
from blockpress.agents.tools import ENTRY_POINT_GROUP, Tool, ToolRegistry

__all__ = ["builtin_tools", "calculator_tool", "http_get_tool", "installed_tool_names", "python_tool"]


def calculator(expression: str) -> int | float:
    """Evaluates an arithmetic expression exactly and returns its value.

    Args:
        expression: Arithmetic such as 37*41+12 or sqrt(2)**2: numbers, + - * / // % **,
            parentheses, pi, e and abs/round/min/max/sqrt/log/exp/sin/cos/tan/floor/ceil.
    """
    return evaluate(expression)


def calculator_tool() -> Tool:
    return Tool.from_function(calculator)


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    """The `python` tool, running each script in the sandbox under `limits`."""

    def python(code: str) -> dict[str, Any]:
        """Runs a Python script in a sandbox without network access and returns what it printed.

        Args:
            code: A complete Python script; print() the values you need.
        """
        result = run_python(code, limits)
        if result.outcome != "ok":
            detail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.exit_code}"]
            raise ToolFailed(f"the script stopped ({result.outcome}): {detail[0]}"[:2000])
        return {"stdout": result.stdout, "stderr": result.stderr}

    # The sandbox is a bounded process of its own and stops at the task's budget itself.
    return Tool.from_function(python, isolated=False)


def builtin_tools(*, http_allowed_hosts: Collection[str] = (), sandbox: SandboxLimits | None = None) -> ToolRegistry:
    """A registry with the built-ins; `http_get` only when the operator allowed some hosts."""
    registry = ToolRegistry([calculator_tool(), python_tool(sandbox)])
    if http_allowed_hosts:
        registry.register(http_get_tool(http_allowed_hosts))
    return registry


def installed_tool_names(*, http_get: bool = False) -> list[str]:
    """Names a replica's default registry will hold, without importing any plugin.

    For the gateway, which refuses a task naming an unknown tool before it reaches Redis.
    """
    names = {"calculator", "python", *(["http_get"] if http_get else [])}
    return sorted(names | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
