"""The built-in tools: `calculator`, `python` (sandboxed) and `http_get` (allow-listed hosts only)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection
from importlib.metadata import entry_points
from typing import Any

from blockpress.agents.calculator import evaluate
from blockpress.agents.errors import ToolFailed
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

    return Tool.from_function(python)


def http_get_tool(allowed_hosts: Collection[str], *, timeout: float = 10.0, max_bytes: int = 256 * 2**10) -> Tool:
    """The `http_get` tool, limited to `allowed_hosts` (exact host names) and http(s)."""
    hosts = frozenset(h.lower() for h in allowed_hosts)

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        # A redirect could leave the allow-list; the model can follow it with a second call.
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect)

    def http_get(url: str) -> dict[str, Any]:
        """Fetches a URL with HTTP GET and returns its status and text.

        Args:
            url: An http or https URL on one of the hosts the operator allowed.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or (parts.hostname or "").lower() not in hosts:
            raise ToolFailed(f"only http(s) URLs on these hosts are allowed: {', '.join(sorted(hosts))}")
        try:
            with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
                body = resp.read(max_bytes + 1)
                status = resp.status
        except urllib.error.HTTPError as exc:
            exc.close()
            return {"status": exc.code, "text": ""}
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ToolFailed(f"request failed: {exc}") from None
        text = body[:max_bytes].decode("utf-8", errors="replace")
        return {"status": status, "text": text, "truncated": len(body) > max_bytes}

    return Tool.from_function(http_get)


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
