"""Safe arithmetic: a whitelist walk over Python's expression AST, never `eval`.

Numbers, + - * / // % **, unary signs, parentheses, the constants pi/e/tau and a few math
functions. Limits keep a hostile expression cheap: its length, its nesting, exponents, the digits
of `round`, and the size of every intermediate integer. They bound the inputs of every operation
that can grow a number (`**` and `round`, whose negative ndigits builds 10**-ndigits), not only its
result: a result check comes too late for an operation that first builds a huge integer. The
registry also runs the calculator in a child process killed at its budget, for any case missed here.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from blockpress.agents.errors import ToolFailed

__all__ = ["evaluate"]

MAX_LENGTH = 500
MAX_DEPTH = 40
MAX_INT_BITS = 4096
MAX_EXPONENT = 10_000
MAX_NDIGITS = 400
"""`round`'s ndigits: CPython builds 10**abs(ndigits) for an int; 400 digits is past any float."""

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression such as ``37*41+12`` or ``sqrt(2)**2``.

    Raises:
        ToolFailed: the expression is not arithmetic, too large, or undefined (division by zero).
    """
    if len(expression) > MAX_LENGTH:
        raise ToolFailed(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolFailed(f"not an arithmetic expression: {exc}") from None
    try:
        value = _eval(tree.body, 0)
    except ZeroDivisionError:
        raise ToolFailed("division by zero") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise ToolFailed(f"cannot compute: {exc}") from None
    # Integral floats read as integers: a model copies "1529" more reliably than "1529.0".
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _check(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolFailed("only numbers are allowed")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolFailed(f"an intermediate result exceeds {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolFailed("the result is not finite")
    return value


def _eval(node: ast.AST, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ToolFailed(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        return _check(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        value = _eval(node.operand, depth + 1)
        return _check(-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        if type(node.op) in _BINARY:
            # Operands are at most MAX_INT_BITS each, so even a product is cheap before _check.
            return _check(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords or len(node.args) > 8:
            raise ToolFailed(f"{node.func.id}() takes up to 8 positional numbers")
        args = [_eval(a, depth + 1) for a in node.args]
        if node.func.id == "round" and len(args) >= 2 and isinstance(args[1], int) and abs(args[1]) > MAX_NDIGITS:
            raise ToolFailed(f"round() takes at most {MAX_NDIGITS} digits either way")
        return _check(_FUNCTIONS[node.func.id](*args))
    raise ToolFailed(f"not allowed in an arithmetic expression: {ast.unparse(node)[:40]!r}")


def _power(base: Any, exponent: Any) -> Any:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolFailed(f"exponent larger than {MAX_EXPONENT}")
    # Bound the result's size before computing it: bits(base**n) >= n * (bits(base) - 1).
    ints = isinstance(base, int) and isinstance(exponent, int)
    if ints and exponent > 0 and abs(base) > 1 and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
        raise ToolFailed(f"the result would exceed {MAX_INT_BITS} bits")
    return base**exponent
