"""Every tool call is bounded in time and memory from outside the tool (issue 17, item 2).

The probe's repro: `round(1, -10**9)` passed the calculator's checks and CPython built a
10**9-digit integer holding the GIL, so the replica froze and the agent's `max_seconds` and a cancel
were both ignored. Here the tools run for real (child processes, the real sandbox); `grow` stands for
any case a tool's own checks miss. The longest a call held its caller past its budget is printed
(`overhang`) and held under `MAX_OVERHANG_S`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from blockpress.agents import AgentLoop, AgentTask, ToolRegistry, tool
from blockpress.agents.builtins import builtin_tools
from blockpress.agents.isolation import Budget, ToolLimits
from blockpress.agents.testing import ScriptedModel, call
from blockpress.agents.toolcalls import ToolCall

MAX_OVERHANG_S = 0.5
"""How long a call may outlive its budget: the kill, the reap and one poll, on a loaded 2-core box."""


def grow(digits: int) -> int:
    """Builds 10**digits, holding the GIL all along: the case a tool's own checks missed."""
    return len(str(10**digits))


def hog(mib: int) -> int:
    """Allocates `mib` MiB."""
    return len(bytearray(mib * 2**20))


def whoami() -> list[int]:
    """The tool process's pid and its parent's."""
    return [os.getpid(), os.getppid()]


def linger(seconds: float) -> int:
    """Starts a child process that outlives the call, and returns its pid."""
    import subprocess

    return subprocess.Popen(["sleep", str(seconds)], start_new_session=False).pid


def crash() -> None:
    """Kills its own process."""
    os.kill(os.getpid(), 9)


@tool
def decorated_whoami() -> list[int]:
    """The pid of the process a `@tool`-decorated module function runs in, and its parent's."""
    return [os.getpid(), os.getppid()]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    return fn(), time.monotonic() - start


def _ticks_while(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Runs `fn` while another thread of this process counts 10 ms ticks: is the GIL free?"""
    ticks, done = [0], threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.01)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        result, elapsed = _timed(fn)
    finally:
        done.set()
        ticker.join()
    return result, elapsed, ticks[0]


def _budget(seconds: float, cancelled: Callable[[], bool] = lambda: False) -> Budget:
    return Budget(time.monotonic() + seconds, cancelled)


def test_a_tool_the_checks_missed_is_killed_at_its_budget_and_the_replica_keeps_running() -> None:
    registry = ToolRegistry([tool(grow)])
    result, elapsed, ticks = _ticks_while(
        lambda: registry.invoke(ToolCall("grow", {"digits": 10**9}), ["grow"], budget=_budget(1.0))
    )
    assert not result.ok and "budget of 1 s" in result.error
    overhang = elapsed - 1.0
    print(f"overhang grow: {overhang:.3f} s")
    assert -0.05 < overhang < MAX_OVERHANG_S
    assert ticks > 50, "the caller's other threads ran meanwhile"


def test_a_closure_tool_is_bounded_too() -> None:
    @tool
    def spin() -> int:
        """Never returns."""
        while True:
            pass

    result, elapsed = _timed(lambda: ToolRegistry([spin]).invoke(ToolCall("spin", {}), ["spin"], budget=_budget(0.5)))
    assert not result.ok and "budget" in result.error
    print(f"overhang closure: {elapsed - 0.5:.3f} s")
    assert elapsed - 0.5 < MAX_OVERHANG_S


def test_a_tool_past_its_memory_limit_fails_without_touching_the_caller() -> None:
    registry = ToolRegistry([tool(hog)], limits=ToolLimits(memory_bytes=256 * 2**20))
    result, elapsed = _timed(lambda: registry.invoke(ToolCall("hog", {"mib": 4096}), ["hog"]))
    assert not result.ok and "memory" in result.error
    assert elapsed < 5
    assert registry.invoke(ToolCall("hog", {"mib": 16}), ["hog"]).value == 16 * 2**20


@pytest.mark.parametrize(
    "expression",
    [
        "round(1, -10**9)",
        "round(1, -10**1000)",
        "round(2**4000, -10**7)",
        "round(1.5, 10**9)",
        "round(1, -(10**4)*(10**4))",
        "10**10**10",
        "(10**4000)*(10**4000)",
        "2**(2**64)",
        "9**9**9",
        "floor(1e308)**1000",
        "max(10**1000, 1)**100",
        "-(2**4096)**2",
        "exp(10**6)",
        "round(1, -" + "9" * 400 + ")",
    ],
)
def test_number_growing_expressions_end_fast_with_an_error(expression: str) -> None:
    result, elapsed = _timed(
        lambda: builtin_tools().invoke(ToolCall("calculator", {"expression": expression}), ["calculator"])
    )
    assert not result.ok, result
    assert elapsed < 2.0, f"{expression}: {elapsed:.2f} s"


def test_the_calculator_still_computes() -> None:
    registry = builtin_tools()
    for expression, value in [("37*41+12", 1529), ("round(3.14159, 2)", 3.14), ("round(1234, -2)", 1200)]:
        assert registry.invoke(ToolCall("calculator", {"expression": expression}), ["calculator"]).value == value


def test_the_agent_max_seconds_bounds_a_tool_call() -> None:
    registry = ToolRegistry([tool(grow)])
    model = ScriptedModel([call("grow", digits=10**9), "gave up<turn|>"])
    task = AgentTask.from_instructions("grow", tools=("grow",), max_seconds=1.0)
    result, elapsed = _timed(lambda: AgentLoop(model, registry).run(task))
    assert "budget" in result.turns[0].result["error"]
    print(f"overhang max_seconds: {elapsed - 1.0:.3f} s")
    assert elapsed - 1.0 < MAX_OVERHANG_S


@pytest.mark.parametrize(("name", "arguments"), [("grow", {"digits": 10**9}), ("python", {"code": "while True: pass"})])
def test_a_cancel_stops_a_running_tool(name: str, arguments: dict[str, Any]) -> None:
    registry = builtin_tools()
    registry.register(tool(grow))
    cancel_at = time.monotonic() + 0.5
    budget = _budget(10.0, lambda: time.monotonic() >= cancel_at)
    result, elapsed = _timed(lambda: registry.invoke(ToolCall(name, arguments), [name], budget=budget))
    assert not result.ok
    assert "cancel" in result.error or "timeout" in result.error
    print(f"overhang cancel {name}: {elapsed - 0.5:.3f} s")
    assert elapsed - 0.5 < MAX_OVERHANG_S


def test_the_python_sandbox_stops_at_the_task_budget_not_its_own_longer_one() -> None:
    registry = builtin_tools()
    result, elapsed = _timed(
        lambda: registry.invoke(ToolCall("python", {"code": "while True: pass"}), ["python"], budget=_budget(0.7))
    )
    assert not result.ok and "timeout" in result.error
    print(f"overhang python: {elapsed - 0.7:.3f} s")
    assert elapsed - 0.7 < MAX_OVERHANG_S


def test_a_warm_tool_process_is_reused_and_replaced_after_a_runaway_call() -> None:
    registry = ToolRegistry([tool(whoami), tool(grow), tool(crash)])
    first = registry.invoke(ToolCall("whoami", {}), ["whoami"]).value
    second, elapsed = _timed(lambda: registry.invoke(ToolCall("whoami", {}), ["whoami"]).value)
    assert first == second and first[1] == os.getpid() != first[0], "one warm child of this process, reused"
    assert elapsed < 0.05, f"a warm call took {elapsed:.3f} s"

    runaway = registry.invoke(ToolCall("grow", {"digits": 10**9}), ["grow"], budget=_budget(0.5))
    assert not runaway.ok and "budget" in runaway.error
    assert _gone_within(first[0], 2.0), "the runaway call's process was killed"
    after, elapsed = _timed(lambda: registry.invoke(ToolCall("whoami", {}), ["whoami"]))
    assert after.ok and after.value[0] != first[0] and after.value[1] == os.getpid(), after
    print(f"first call after a kill: {elapsed * 1e3:.1f} ms")

    died = registry.invoke(ToolCall("crash", {}), ["crash"])
    assert not died.ok and "died" in died.error, died
    assert registry.invoke(ToolCall("whoami", {}), ["whoami"]).value[0] not in (first[0], after.value[0])


def test_nothing_a_call_started_outlives_it_in_a_reused_process() -> None:
    registry = ToolRegistry([tool(whoami), tool(linger)])
    worker = registry.invoke(ToolCall("whoami", {}), ["whoami"]).value[0]
    child = registry.invoke(ToolCall("linger", {"seconds": 60}), ["linger"]).value
    assert _gone_within(child, 2.0), "the child the call left behind was killed with its process"
    assert _gone_within(worker, 2.0)
    assert registry.invoke(ToolCall("whoami", {}), ["whoami"]).value[0] != worker


def test_a_decorated_module_tool_runs_in_the_warm_process_too() -> None:
    # `@tool` puts a Tool where pickle looks for the function; it must not fall back to a fork per call.
    registry = ToolRegistry([decorated_whoami])
    first, second = (registry.invoke(ToolCall("decorated_whoami", {}), ["decorated_whoami"]).value for _ in "12")
    assert first == second and first[1] == os.getpid() != first[0]
