"""Tool schemas from typed functions, argument validation, the registry and the built-ins."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Literal
from unittest import mock

import pytest

from blockpress.agents import Tool, ToolRegistry, builtin_tools, tool
from blockpress.agents.builtins import http_get_tool
from blockpress.agents.calculator import evaluate
from blockpress.agents.errors import InvalidAgentTask, InvalidToolArguments, ToolConfigError, ToolFailed
from blockpress.agents.schema import validate
from blockpress.agents.toolcalls import ToolCall


def search(query: str, limit: int = 5, mode: Literal["fast", "exact"] = "fast", tags: list[str] | None = None) -> str:
    """Searches the notes.

    Args:
        query: What to look for.
        limit: How many hits to return,
            at most.
        mode: How to match.
    """
    return f"{query}:{limit}:{mode}:{tags}"


def test_schema_from_a_typed_function_with_docstring_descriptions() -> None:
    t = Tool.from_function(search)
    assert t.name == "search" and t.description == "Searches the notes."
    assert t.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "limit": {"type": "integer", "description": "How many hits to return, at most."},
            "mode": {"type": "string", "enum": ["fast", "exact"], "description": "How to match."},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        },
        "required": ["query"],
        "additionalProperties": False,
    }
    assert t.declaration()["function"]["name"] == "search"


@pytest.mark.parametrize(
    "args, path",
    [
        ({}, "$"),  # missing required
        ({"query": 3}, "$.query"),
        ({"query": "x", "limit": True}, "$.limit"),  # a bool is not an integer
        ({"query": "x", "limit": 1.5}, "$.limit"),
        ({"query": "x", "mode": "slow"}, "$.mode"),
        ({"query": "x", "tags": ["a", 1]}, "$.tags"),
        ({"query": "x", "extra": 1}, "$"),
    ],
)
def test_invalid_arguments_name_the_path(args: dict, path: str) -> None:
    with pytest.raises(InvalidToolArguments) as info:
        validate(Tool.from_function(search).parameters, args)
    assert info.value.path == path


def test_valid_arguments_pass() -> None:
    validate(Tool.from_function(search).parameters, {"query": "x", "limit": 2, "tags": None, "mode": "exact"})
    validate({"type": "object", "additionalProperties": {"type": "number"}}, {"a": 1, "b": 2.5})


def test_unsupported_signatures_are_a_config_error() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def varargs(*xs: int) -> int:
        return 0

    def weird(x: set[int]) -> int:
        return 0

    for fn in (untyped, varargs, weird):
        with pytest.raises(ToolConfigError):
            Tool.from_function(fn)


def test_registry_refuses_duplicates_and_unknown_task_tools() -> None:
    registry = ToolRegistry([Tool.from_function(search)])
    with pytest.raises(ToolConfigError):
        registry.register(search)
    with pytest.raises(InvalidAgentTask) as info:
        registry.select(["search", "rm_rf"])
    assert info.value.field == "tools" and "rm_rf" in str(info.value)


def test_invoke_never_raises_and_never_runs_what_is_not_allowed() -> None:
    ran: list[str] = []

    @tool
    def secret(x: int) -> int:
        """Should not run."""
        ran.append("secret")
        return x

    @tool(name="boom")
    def explode() -> int:
        """Raises."""
        raise RuntimeError("kaput")

    registry = ToolRegistry([secret, explode])
    refused = registry.invoke(ToolCall("secret", {"x": 1}), allowed=["boom"])
    assert not refused.ok and "not available" in refused.error and ran == []
    bad = registry.invoke(ToolCall("secret", {"x": "1"}), allowed=["secret"])
    assert not bad.ok and "$.x" in bad.error and ran == []
    crashed = registry.invoke(ToolCall("boom", {}), allowed=["boom"])
    assert crashed.error == "RuntimeError: kaput"
    assert registry.invoke(ToolCall("secret", {"x": 2}), allowed=["secret"]).content() == {"result": 2}


def test_entry_point_tools_load_and_broken_ones_are_reported() -> None:
    good = mock.Mock()
    good.name, good.value = "search", "x:search"
    good.load.return_value = search
    broken = mock.Mock()
    broken.name, broken.value = "broken", "x:broken"
    broken.load.side_effect = ImportError("no module x")
    registry = ToolRegistry()
    with mock.patch("blockpress.agents.tools.entry_points", return_value=[good]):
        assert registry.load_entry_points() == ["search"]
    with (
        mock.patch("blockpress.agents.tools.entry_points", return_value=[broken]),
        pytest.raises(ToolConfigError, match="broken"),
    ):
        registry.load_entry_points()


@pytest.mark.parametrize(
    "expression, value",
    [
        ("37*41+12", 1529),
        ("2**10", 1024),
        ("10/4", 2.5),
        ("-(3 - 5) * 2", 4),
        ("sqrt(16)", 4),
        ("7 // 2 % 3", 0),
    ],
)
def test_calculator_computes(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "(1).__class__",
        "open('x')",
        "[1, 2]",
        "lambda: 1",
        "9**9**9",  # would take forever without the exponent bound
        "10**5000",
        "2**4000 * 2**4000",
        "1/0",
        "x + 1",
        "1e308 * 10",
        "(" * 300 + "1" + ")" * 300,
        "1+" * 400 + "1",
        "'a' * 3",
        "True + 1",
    ],
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression: str) -> None:
    with pytest.raises(ToolFailed):
        evaluate(expression)


def test_installed_tool_names_match_the_default_registry_without_loading_plugins() -> None:
    from blockpress.agents.builtins import installed_tool_names

    assert installed_tool_names() == builtin_tools().names()
    assert installed_tool_names(http_get=True) == builtin_tools(http_allowed_hosts=["x.org"]).names()
    plugin = mock.Mock()
    plugin.name = "weather"
    with mock.patch("blockpress.agents.builtins.entry_points", return_value=[plugin]):
        assert installed_tool_names() == ["calculator", "python", "weather"]
    plugin.load.assert_not_called()


def test_http_get_is_off_by_default_and_limited_to_allowed_hosts() -> None:
    assert "http_get" not in builtin_tools()
    assert "http_get" in builtin_tools(http_allowed_hosts=["example.org"])
    fetch = http_get_tool(["example.org"]).fn
    for url in (
        "http://evil.example/x",
        "file:///etc/passwd",
        "ftp://example.org/x",
        "http://example.org.evil/",
    ):
        with pytest.raises(ToolFailed, match="only http"):
            fetch(url=url)


@pytest.fixture
def local_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://elsewhere.invalid/")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from " + self.path.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_get_fetches_from_an_allowed_host_and_does_not_follow_redirects(local_server: int) -> None:
    fetch = http_get_tool([f"127.0.0.1:{local_server}"], timeout=5).fn
    assert fetch(url=f"http://127.0.0.1:{local_server}/page") == {
        "status": 200,
        "text": "hello from /page",
        "truncated": False,
    }
    assert fetch(url=f"http://127.0.0.1:{local_server}/away")["status"] == 302


def test_builtin_declarations_are_the_ones_the_tiny_checkpoint_was_trained_on() -> None:
    # The shipped calculator checkpoint saw these exact declarations; a changed docstring would put
    # every agent task out of its training distribution.
    from blockpress.workers.tinytrain.data import TOOL_SETS

    declared = [t.declaration() for t in builtin_tools().select(["calculator", "python"])]
    assert declared in [list(tools) for tools in TOOL_SETS]
