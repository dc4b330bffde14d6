"""The architecture's import rules, read statically from the source (function-level imports included).

- No import cycle between modules: every strongly connected component of the module graph is one module.
- `blockpress.agents` imports no other BlockPress package; `blockpress.runtime` imports neither workers
  nor agents, except its composition root (`blockpress.runtime.cli`); `blockpress.workers` never imports
  the gateway, the SDK or the CLI.
- `from blockpress.runtime import Client` loads neither torch, Ray nor the agent loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"runtime": "blockpress.runtime", "workers": "blockpress.workers", "agents": "blockpress.agents"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            if "_pb" in rel.parts or "checkpoints" in rel.parts:
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        # The longest known module the import names: `from a.b import c` is module a.b.c or a.b.
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in known:
                return candidate
            parts.pop()
        return None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (target := resolve(alias.name)) is not None:
                        found.add(target)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    prefix = ".".join(base[: len(base) - child.level + 1])
                    name = f"{prefix}.{child.module}" if child.module else prefix
                else:
                    name = child.module or ""
                for alias in child.names:
                    if (target := resolve(f"{name}.{alias.name}")) is not None:
                        found.add(target)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(module)
    # A submodule importing its own package's __init__ is Python's normal import order, not a cycle.
    return {m for m in found if not module.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_checker_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_packages_import_in_one_direction() -> None:
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if module.startswith("blockpress.agents") and not target.startswith("blockpress.agents"):
                wrong.append((module, target))
            if (
                module.startswith("blockpress.runtime")
                and not module.startswith("blockpress.runtime.cli")
                and target.startswith(("blockpress.workers", "blockpress.agents"))
            ):
                wrong.append((module, target))
            if module.startswith("blockpress.workers") and target.startswith(
                ("blockpress.runtime.gateway", "blockpress.runtime.sdk", "blockpress.runtime.cli")
            ):
                wrong.append((module, target))
    assert wrong == []


def test_no_source_file_is_too_long() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    long = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert long == {}


def test_the_client_loads_no_engine_ray_or_agent_loop() -> None:
    code = (
        "import sys\n"
        "from blockpress.runtime import Client, AsyncClient\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'blockpress.agents', 'blockpress.workers') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
