"""JSON schemas derived from typed Python functions, and a validator for exactly that subset.

Supported parameter types: int, float, str, bool, list[T], dict[str, T], Literal[...], T | None
(Optional). The validator understands what `schema_for` produces (type, properties, required,
additionalProperties, items, enum, anyOf) and nothing more; the `jsonschema` package is not a
dependency because this subset is all a tool declaration needs.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from blockpress.agents.errors import InvalidToolArguments, ToolConfigError

__all__ = ["docstring_parts", "schema_for", "validate"]

_SCALARS: Mapping[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def docstring_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """A Google-style docstring's summary and its `Args:` descriptions by parameter name."""
    doc = inspect.getdoc(fn) or ""
    summary_lines: list[str] = []
    args: dict[str, str] = {}
    section = "summary"
    current = ""
    for line in doc.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):
            section = "args" if stripped in ("Args:", "Arguments:", "Parameters:") else "other"
            continue
        if section == "summary":
            summary_lines.append(stripped)
        elif section == "args" and stripped:
            match = re.match(r"(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if match and not line.startswith("        "):
                current = match.group(1).lstrip("*")
                args[current] = match.group(2)
            elif current:
                args[current] = f"{args[current]} {stripped}".strip()
    summary = " ".join(" ".join(summary_lines).split())
    return summary, args


def _type_schema(tp: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is Literal:
        values = list(typing.get_args(tp))
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or next(iter(kinds)) not in _SCALARS:
            raise ToolConfigError(f"{where}: Literal values must share one scalar type")
        return {"type": _SCALARS[next(iter(kinds))], "enum": values}
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            raise ToolConfigError(f"{where}: only `T | None` unions are supported")
        return {"anyOf": [_type_schema(members[0], where), {"type": "null"}]}
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return {"type": "array", **({"items": _type_schema(args[0], where)} if args else {})}
    if tp is dict or origin is dict:
        args = typing.get_args(tp)
        if args and args[0] is not str:
            raise ToolConfigError(f"{where}: dict keys must be str")
        return {"type": "object", **({"additionalProperties": _type_schema(args[1], where)} if args else {})}
    raise ToolConfigError(f"{where}: unsupported parameter type {tp!r}")


def schema_for(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of `fn`'s keyword arguments, with descriptions from its docstring.

    Raises:
        ToolConfigError: a parameter has no annotation or an unsupported type.
    """
    name = getattr(fn, "__name__", repr(fn))
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # any failure to resolve annotations is the tool author's to fix
        raise ToolConfigError(f"{name}: cannot resolve type hints: {exc}") from exc
    _, descriptions = docstring_parts(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ToolConfigError(f"{name}: parameter {param.name!r} must be a plain keyword parameter")
        if param.name not in hints:
            raise ToolConfigError(f"{name}: parameter {param.name!r} has no type annotation")
        prop = _type_schema(hints[param.name], f"{name}.{param.name}")
        if param.name in descriptions:
            prop["description"] = descriptions[param.name]
        if param.default is param.empty:
            required.append(param.name)
        properties[param.name] = prop
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _kind_ok(kind: str, value: Any) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return False


def validate(schema: Mapping[str, Any], value: Any, *, path: str = "$", tool: str | None = None) -> None:
    """Checks `value` against `schema`.

    Raises:
        InvalidToolArguments: with the JSON path of the first bad value and the reason.
    """

    def fail(reason: str) -> InvalidToolArguments:
        return InvalidToolArguments(f"{path}: {reason}", tool_name=tool, path=path)

    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                validate(option, value, path=path, tool=tool)
                return
            except InvalidToolArguments:
                continue
        raise fail(f"{value!r} matches none of the allowed types")
    kind = schema.get("type")
    if kind is not None and not _kind_ok(kind, value):
        raise fail(f"expected {kind}, got {type(value).__name__} {value!r}"[:200])
    if "enum" in schema and value not in schema["enum"]:
        raise fail(f"must be one of {schema['enum']!r}, got {value!r}"[:200])
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            validate(schema["items"], item, path=f"{path}[{i}]", tool=tool)
    if kind == "object":
        props: Mapping[str, Any] = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise fail(f"missing required argument {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                validate(props[key], item, path=f"{path}.{key}", tool=tool)
            elif extra is False:
                raise fail(f"unexpected argument {key!r}; allowed: {', '.join(props) or 'none'}")
            elif isinstance(extra, Mapping):
                validate(extra, item, path=f"{path}.{key}", tool=tool)
