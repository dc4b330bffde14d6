"""What a tool call costs with its isolation, against calling the tool's function in-process.

    python bench/tool_calls.py                 # 200 calculator calls each way, then the overrun figures
    python bench/tool_calls.py --calls 1000

Prints the median and p90 per call of `ToolRegistry.invoke` on the built-in calculator (isolated:
a child process bounded in time and memory) and of the bare `calculator()` function, and their
ratio. Then the overrun bound: the longest a runaway call (CPython building 10**(10**9) while
holding the GIL) held its caller past its budget over a few tries, and the latency of the first
call after such a kill (the runaway's process is replaced).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from blockpress.agents import ToolRegistry, tool
from blockpress.agents.builtins import builtin_tools, calculator
from blockpress.agents.isolation import Budget
from blockpress.agents.toolcalls import ToolCall


def grow(digits: int) -> int:
    """Builds 10**digits holding the GIL: a runaway call that no check inside the tool stops."""
    return len(str(10**digits))


def _per_call(fn: Callable[[], Any], calls: int) -> list[float]:
    fn()  # the first call may start the tool's process; the steady state is what an agent pays
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _describe(times: list[float]) -> str:
    ordered = sorted(times)
    return f"median {statistics.median(ordered) * 1e3:8.3f} ms   p90 {ordered[int(len(ordered) * 0.9)] * 1e3:8.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--runaways", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=0.5)
    args = parser.parse_args()

    registry = builtin_tools()
    request = ToolCall("calculator", {"expression": "37*41+12"})
    isolated = _per_call(lambda: registry.invoke(request, ["calculator"]), args.calls)
    direct = _per_call(lambda: calculator("37*41+12"), args.calls)
    print(f"isolated calculator call  {_describe(isolated)}")
    print(f"in-process calculator()   {_describe(direct)}")
    print(f"ratio (median)            {statistics.median(isolated) / statistics.median(direct):8.1f}x")

    # By module name: the tool's process imports it there, and `__main__` is not this file in that process.
    from tool_calls import grow as importable_grow

    runaway = ToolRegistry([tool(importable_grow)])
    overruns, after = [], []
    for _ in range(args.runaways):
        start = time.monotonic()
        budget = Budget(start + args.budget_s, lambda: False)
        result = runaway.invoke(ToolCall("grow", {"digits": 10**8}), ["grow"], budget=budget)
        assert not result.ok and "budget" in (result.error or ""), result
        overruns.append(time.monotonic() - start - args.budget_s)
        start = time.perf_counter()
        assert registry.invoke(request, ["calculator"]).ok
        after.append(time.perf_counter() - start)
    print(f"overrun past a {args.budget_s} s budget   max {max(overruns) * 1e3:8.1f} ms   "
          f"median {statistics.median(overruns) * 1e3:8.1f} ms   ({args.runaways} runaway calls)")  # fmt: skip
    print(f"first call after a kill   max {max(after) * 1e3:8.1f} ms   median {statistics.median(after) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
