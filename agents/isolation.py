"""Runs one tool call in a child process that is killed at its budget, whatever the tool does.

A tool's own checks can miss a case (`round(1, -10**9)` made CPython build a 10**9-digit integer
while holding the GIL, so no thread of the replica could stop it). The bound therefore lives outside
the tool: the call runs in a child process under RLIMIT_AS and RLIMIT_CPU, the parent waits on a
pipe and SIGKILLs the child once the wall-clock budget is spent or the task is cancelled. Only the
result crosses back, pickled over the pipe of the child this process started.

Where the tool's function can be pickled by reference (module-level functions, instances of
module-level classes) the call runs in a warm worker (`blockpress.agents.toolworker`): a fresh
interpreter (`python -c`, never `multiprocessing`'s spawn or forkserver, which re-import the
parent's `__main__`: a Ray worker's or pytest's) started once and reused until a call overruns,
crashes or leaves something behind, so a call costs a round trip over a pipe, not an interpreter
start. A closure cannot be named that way, so it runs in a fork of the replica: the child only runs
the tool and then `os._exit`s, but a lock another thread held at the fork stays held in it, so
shipped tools are all module-level.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blockpress.agents.errors import ToolFailed
from blockpress.agents.toolworker import run_bounded, run_in_worker

__all__ = ["Budget", "ToolLimits", "call_isolated", "current_budget", "tool_budget"]

_POLL_S = 0.01
"""How often the parent looks at the clock and the cancel flag while a child runs."""


@dataclass(frozen=True, kw_only=True)
class ToolLimits:
    """Bounds on one tool call run in a child process."""

    wall_seconds: float = 10.0
    """Wall-clock limit; the agent's remaining `max_seconds` shortens it."""
    memory_bytes: int = 1024 * 2**20
    """RLIMIT_AS of the child: address space it may map, interpreter included."""


@dataclass(frozen=True)
class Budget:
    """What is left of the task for the tool call now running: a deadline and a cancel check."""

    deadline: float
    """`time.monotonic()` seconds past which the call is stopped."""
    cancelled: Callable[[], bool]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("blockpress_tool_budget", default=None)


def current_budget() -> Budget | None:
    """The budget of the tool call running in this context, for tools that bound themselves."""
    return _BUDGET.get()


@contextlib.contextmanager
def tool_budget(budget: Budget) -> Iterator[None]:
    """Makes `budget` the current one while a tool that isolates itself runs."""
    token = _BUDGET.set(budget)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def call_isolated(fn: Callable[..., Any], kwargs: dict[str, Any], *, limits: ToolLimits, budget: Budget) -> Any:
    """`fn(**kwargs)` in a child process, stopped at `budget` (wall clock, cancel) and `limits`.

    Raises:
        ToolFailed: the tool failed, ran out of time or memory, died, or the task was cancelled;
            the message says which.
    """
    timeout = min(limits.wall_seconds, budget.remaining())
    if timeout <= 0:
        raise ToolFailed("no time left in the task's budget for a tool call")
    deadline = time.monotonic() + timeout
    cpu_s = max(1, int(timeout) + 1)
    try:
        payload = pickle.dumps((_by_reference(fn), kwargs, limits.memory_bytes, cpu_s))
    except Exception:
        kind, value = pickle.loads(_run_forked(fn, kwargs, limits, cpu_s, deadline, timeout, budget))
    else:
        module = getattr(fn, "__module__", None) or type(fn).__module__
        stopped = lambda: _stopped(deadline, timeout, budget)  # noqa: E731
        kind, value = run_in_worker(payload, module=module, deadline=deadline, stopped=stopped)
    if kind == "ok":
        return value
    raise ToolFailed(value)


def _by_reference(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, or for a function that `@tool` replaced in its module by a `Tool`, a call that finds it.

    Pickle names a function by module and qualified name; after `@tool` that name holds the `Tool`,
    so the function itself cannot be pickled and would take the fork path.
    """
    module, qualname = str(getattr(fn, "__module__", "")), str(getattr(fn, "__qualname__", ""))
    holder = getattr(sys.modules.get(module), qualname, None) if "." not in qualname else None
    if holder is not fn and getattr(holder, "fn", None) is fn:
        return functools.partial(_call_decorated, module, qualname)
    return fn


def _call_decorated(module: str, qualname: str, /, **kwargs: Any) -> Any:
    return getattr(importlib.import_module(module), qualname).fn(**kwargs)


def _stopped(deadline: float, timeout: float, budget: Budget) -> str | None:
    if time.monotonic() >= deadline:
        return f"the tool ran past its budget of {timeout:.3g} s and was stopped"
    if budget.cancelled():
        return "the task was cancelled while the tool ran; the tool was stopped"
    return None


def _run_forked(
    fn: Callable[..., Any], kwargs: dict[str, Any], limits: ToolLimits, cpu_s: int, deadline: float,
    timeout: float, budget: Budget,
) -> bytes:  # fmt: skip
    # A closure cannot be named to a fresh interpreter: fork, and let the child run only the tool.
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    with _FORK_PAYLOAD_LOCK:
        _FORK_PAYLOAD[:] = [(fn, kwargs, limits.memory_bytes, cpu_s)]
        proc = ctx.Process(target=_fork_entry, args=(child,), daemon=True)
        proc.start()
    child.close()
    try:
        while not parent.poll(_POLL_S):
            if not proc.is_alive() and not parent.poll(0):
                raise ToolFailed(f"the tool's process died (exit status {proc.exitcode}) before it returned")
            if (why := _stopped(deadline, timeout, budget)) is not None:
                raise ToolFailed(why)
        try:
            return parent.recv_bytes()
        except EOFError:
            raise ToolFailed(f"the tool's process died (exit status {proc.exitcode}) before it returned") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
        proc.close()


_FORK_PAYLOAD: list[Any] = []
_FORK_PAYLOAD_LOCK = threading.Lock()


def _fork_entry(conn: Any) -> None:
    reply, _ = run_bounded(*_FORK_PAYLOAD[0])
    try:
        raw = pickle.dumps(reply)
    except Exception as exc:  # an unpicklable result
        raw = pickle.dumps(("error", f"the tool's result cannot be returned: {exc}"))
    conn.send_bytes(raw)
    conn.close()
    os._exit(0)
