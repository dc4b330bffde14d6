"""The python sandbox: every limit stops its offender, reports why, and leaves this process alone."""

from __future__ import annotations

import os
import time

import pytest

from blockpress.agents.builtins import python_tool
from blockpress.agents.errors import ToolFailed
from blockpress.agents.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_seconds=5, cpu_seconds=2)


def test_a_script_runs_and_prints() -> None:
    result = run_python("print(sum(range(10)))", FAST)
    assert (result.outcome, result.exit_code, result.stdout) == ("ok", 0, "45\n")


def test_a_script_that_sleeps_forever_is_killed_at_the_wall_clock_limit() -> None:
    started = time.monotonic()
    result = run_python("import time\nwhile True: time.sleep(1)", SandboxLimits(wall_seconds=1.0))
    assert result.outcome == "timeout"
    assert time.monotonic() - started < 5


def test_a_spinning_script_hits_the_cpu_limit() -> None:
    result = run_python("while True: pass", SandboxLimits(wall_seconds=20, cpu_seconds=1))
    assert result.outcome == "cpu_limit"
    assert result.wall_seconds < 10


def test_unbounded_allocation_hits_the_memory_limit() -> None:
    code = "x = []\nwhile True: x.append(bytearray(10**7))"
    result = run_python(code, SandboxLimits(wall_seconds=20, memory_bytes=256 * 2**20))
    assert result.outcome == "memory_limit"


def test_a_fork_bomb_is_stopped_and_leaves_no_live_process_behind() -> None:
    code = "import os, time\nfor _ in range(10000):\n    os.fork()\ntime.sleep(60)"
    result = run_python(code, SandboxLimits(wall_seconds=10, processes=8))
    assert result.outcome == "process_limit"
    assert "Resource temporarily unavailable" in result.stderr
    assert _live_sandbox_processes() == []


def test_a_fork_bomb_that_swallows_errors_is_killed_with_its_whole_group() -> None:
    code = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    result = run_python(code, SandboxLimits(wall_seconds=2, processes=8))
    assert result.outcome == "timeout"
    assert _live_sandbox_processes() == []


def test_a_daemonized_grandchild_does_not_outlive_the_script() -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    result = run_python(code, SandboxLimits(wall_seconds=10))
    if not result.pid_namespace:
        pytest.fail("this kernel refused a PID namespace; the sandbox reports it, but CI expects one")
    assert (result.outcome, result.stdout) == ("ok", "parent done\n")
    assert result.wall_seconds < 5  # the pipes closed when the namespace went, not at the timeout
    assert _live_sandbox_processes() == []


def test_exit_codes_are_the_scripts_own() -> None:
    result = run_python("import sys; sys.exit(3)", FAST)
    assert (result.outcome, result.exit_code) == ("error", 3)


def _live_sandbox_processes() -> list[str]:
    """Live (not zombie) processes running a sandboxed script: `python -I -B main.py`."""
    live = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if status["State"].strip().startswith("Z") or cmdline.split(b"\0")[1:4] != [b"-I", b"-B", b"main.py"]:
            continue
        live.append(pid)
    return live


def test_the_environment_is_empty_and_the_cwd_is_a_fresh_temp_dir() -> None:
    os.environ["BP_SANDBOX_SECRET"] = "hunter2"
    try:
        result = run_python("import os, json\nprint(json.dumps([dict(os.environ), os.getcwd(), os.listdir('.')]))")
    finally:
        del os.environ["BP_SANDBOX_SECRET"]
    assert "hunter2" not in result.stdout and '"/tmp/work"' in result.stdout  # on the private tmpfs
    assert "main.py" in result.stdout


def test_file_size_is_limited() -> None:
    result = run_python("open('big', 'wb').write(b'x' * 10**7)", SandboxLimits(file_bytes=2**20))
    assert result.outcome in ("error", "killed") and result.exit_code != 0


def test_the_network_is_unreachable_when_the_kernel_allows_isolation() -> None:
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('10.255.255.1', 80), timeout=1)\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    result = run_python(code, FAST)
    if result.network != "isolated":
        pytest.fail("this kernel refused a network namespace; the sandbox reports it, but CI expects isolation")
    assert result.stdout.strip() == "101"  # ENETUNREACH: no interface but a down loopback


def test_output_is_truncated() -> None:
    result = run_python("print('x' * 100000)", SandboxLimits(output_bytes=1000))
    assert result.outcome == "output_limit" and result.stdout.endswith("[output truncated]")


def test_the_python_tool_turns_limits_into_tool_errors() -> None:
    run = python_tool(SandboxLimits(wall_seconds=1)).fn
    assert run(code="print(6*7)") == {"stdout": "42\n", "stderr": ""}
    with pytest.raises(ToolFailed, match="timeout"):
        run(code="while True: pass")
    with pytest.raises(ToolFailed, match="ZeroDivisionError"):
        run(code="1/0")
