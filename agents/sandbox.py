"""Runs untrusted Python in a subprocess with resource limits.

The child starts as ``python -I`` with an empty environment in a fresh temporary directory, in its
own session (so a timeout can kill its whole process group). A small bootstrap inside the child
then, before any user code: leaves the network namespace when the kernel allows it, sets
RLIMIT_CPU/AS/FSIZE/NOFILE/NPROC/CORE, drops to an unprivileged user when started as root (root
ignores RLIMIT_NPROC), and execs a fresh interpreter on the user's script. Limits survive exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from typing import Literal

from blockpress.agents.errors import ToolConfigError
from blockpress.agents.isolation import current_budget

__all__ = ["SandboxLimits", "SandboxResult", "SandboxUnavailable", "run_python"]


class SandboxUnavailable(ToolConfigError):
    """The kernel refused a namespace the sandbox needs; nothing of the script ran."""


Outcome = Literal["ok", "error", "timeout", "cpu_limit", "memory_limit", "process_limit", "killed", "output_limit"]

# Runs inside the child before the user's code. Kept as source so that the parent never forks with
# `preexec_fn`, which is unsafe in the threaded processes (Ray actors) that host the sandbox.
# With a PID namespace there are three processes: this one (outside, waits), the namespace's init
# (reaps orphans; when it exits the kernel kills everything left in the namespace, so nothing the
# script spawns, daemonized or not, outlives it) and the script itself, which is not init and so
# gets SIGXCPU like any process. Status lines go to the parent through the `status` pipe.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
status = int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
NEWNET, NEWPID, NEWUSER, NEWNS = 0x40000000, 0x20000000, 0x10000000, 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 1, 2, 4, 0x4000, 0x40000
root = os.getuid() == 0
flags = NEWNS | NEWPID | (NEWNET if cfg["isolate_network"] else 0)
if libc.unshare(flags) != 0 and (root or libc.unshare(flags | NEWUSER) != 0):
    # Refuse rather than run with the host's network, processes or files in reach.
    what = "mount, pid" + (", network" if flags & NEWNET else "")
    os.write(status, f"refused unshare({what}) failed: {os.strerror(ctypes.get_errno())}\n".encode())
    os._exit(0)

def mount(src, target, fstype, mflags, data):
    if libc.mount(src, target.encode(), fstype, mflags, data) != 0:
        os.write(status, f"refused mount on {target} failed: {os.strerror(ctypes.get_errno())}\n".encode())
        os._exit(0)

# Mounts stay in this namespace; then a private, size-limited tmpfs over every world-writable
# scratch dir (/tmp holds Ray's logs too) and an empty read-only one over each hidden host path.
mount(b"none", "/", None, MS_REC | MS_PRIVATE, None)
code = open("main.py", "rb").read()
size = f"size={cfg['tmpfs_bytes']},mode=1777".encode()
for path in ("/tmp", "/var/tmp", "/dev/shm"):
    if os.path.isdir(path):
        mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, size)
for path in cfg["hidden"]:
    if os.path.exists(path):
        mount(b"tmpfs", path, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=4k,mode=0")
os.makedirs("/tmp/work", mode=0o700)
with open("/tmp/work/main.py", "wb") as f:
    f.write(code)
if root:
    os.chown("/tmp/work", cfg["uid"], cfg["gid"])
os.chdir("/tmp/work")
os.write(status, f"network {'isolated' if flags & NEWNET else 'shared'}\npidns 1\nfs private\n".encode())

def script():
    os.close(status)
    for name, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value + (1 if name == "RLIMIT_CPU" else 0)))
    if root:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    os.execv(cfg["python"], [cfg["python"], "-I", "-B", "main.py"])

def report(st):
    end = f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"exit {os.WEXITSTATUS(st)}"
    os.write(status, f"{end}\n".encode())
    os._exit(0)

init = os.fork()
if init == 0:
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the waiter outside
    child = os.fork()
    if child == 0:
        script()
    while True:
        pid, st = os.wait()
        if pid == child:
            report(st)
os.waitpid(init, 0)
os._exit(0)
"""

_NOBODY = 65534


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Limits for one run. Defaults suit a calculator-sized script on a shared machine."""

    wall_seconds: float = 10.0
    """Wall-clock limit; past it the whole process group is killed."""
    cpu_seconds: int = 5
    """RLIMIT_CPU: CPU seconds before SIGXCPU, one more before SIGKILL."""
    memory_bytes: int = 512 * 2**20
    """RLIMIT_AS: address space, which bounds what the script can allocate."""
    file_bytes: int = 8 * 2**20
    """RLIMIT_FSIZE: largest file the script may write."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    processes: int = 16
    """RLIMIT_NPROC: processes of the sandbox user; stops fork bombs."""
    output_bytes: int = 256 * 2**10
    """stdout and stderr are each cut to this many bytes."""
    isolate_network: bool = True
    """Run without network (own network namespace); the sandbox refuses to run if it cannot."""
    tmpfs_bytes: int = 64 * 2**20
    """Size of each private tmpfs (/tmp, /var/tmp, /dev/shm) the script sees instead of the host's."""
    hidden_paths: tuple[str, ...] = (".data", "/var/lib/redis", "/var/log")
    """Host paths covered by an empty read-only tmpfs: the data dir (`.data` is the runtime's default,
    relative to the replica's working directory; Redis's append-only file and serve.log live there)
    and log folders. /tmp (Ray's session logs) is private anyway."""


@dataclass(frozen=True)
class SandboxResult:
    """What one run did. `outcome` is "ok" only for exit status 0 within every limit."""

    outcome: Outcome
    exit_code: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    network: str
    """"isolated" or "shared" (the kernel refused a new network namespace)."""
    pid_namespace: bool
    """Whether the script ran in its own PID namespace, so nothing it started outlived it."""


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Runs `code` as a script under `limits` and reports how it ended; never raises for its failures."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="bp-sandbox-") as cwd:
        with open(os.path.join(cwd, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if os.getuid() == 0:
            os.chown(cwd, _NOBODY, _NOBODY)
            os.chmod(cwd, 0o700)
        cfg = {
            "python": _interpreter(),
            "isolate_network": limits.isolate_network,
            "tmpfs_bytes": limits.tmpfs_bytes,
            "hidden": [os.path.realpath(p) for p in limits.hidden_paths],
            "uid": _NOBODY,
            "gid": _NOBODY,
            "limits": {
                "RLIMIT_CPU": limits.cpu_seconds,
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_FSIZE": limits.file_bytes,
                "RLIMIT_NOFILE": limits.open_files,
                "RLIMIT_NPROC": limits.processes,
                "RLIMIT_CORE": 0,
            },
        }
        status_r, status_w = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg), str(status_w)],
                cwd=cwd,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(status_w,),
            )
        finally:
            os.close(status_w)
        try:
            out, err, timed_out = _wait(proc, limits.wall_seconds)
        finally:
            _kill_group(proc.pid)  # without a PID namespace: children the script left behind
        wall = time.monotonic() - start
        with os.fdopen(status_r) as pipe:
            status = dict(line.split(" ", 1) for line in pipe.read().splitlines() if " " in line)
    if "refused" in status:
        raise SandboxUnavailable(
            f"the python sandbox refuses to run unisolated: {status['refused']} "
            "(it needs mount, PID and network namespaces: run the replica as root or allow user namespaces)"
        )
    exit_code = _exit_code(status, proc.returncode)
    stderr = _cut(err, limits.output_bytes)
    return SandboxResult(
        outcome=_outcome(exit_code, timed_out, stderr, len(out) > limits.output_bytes),
        exit_code=exit_code,
        stdout=_cut(out, limits.output_bytes),
        stderr=stderr,
        wall_seconds=wall,
        network=status.get("network", "shared"),
        pid_namespace=status.get("pidns") == "1",
    )


@cache
def _interpreter() -> str:
    """An interpreter the sandbox user can execute: ours, else the system's.

    Raises:
        ToolConfigError: started as root and no interpreter is executable by the unprivileged user.
    """
    ours = os.path.realpath(sys.executable)
    if os.getuid() != 0:
        return ours
    for candidate in (ours, "/usr/bin/python3", "/usr/local/bin/python3"):
        path = os.path.realpath(candidate)
        parts = [path, os.path.dirname(path)]
        while parts[-1] != "/":
            parts.append(os.path.dirname(parts[-1]))
        try:
            if all(os.stat(p).st_mode & 0o001 for p in parts):
                return path
        except OSError:
            continue
    raise ToolConfigError(
        f"the python sandbox drops root to uid {_NOBODY}, who cannot execute {ours} or a system "
        "python3; install a world-executable python3 or run the replica as a non-root user"
    )


def _wait(proc: subprocess.Popen[bytes], wall_seconds: float) -> tuple[bytes, bytes, bool]:
    """The script's output and whether it was stopped: at `wall_seconds`, or at the agent's budget."""
    budget = current_budget()
    deadline = time.monotonic() + wall_seconds
    if budget is not None:
        deadline = min(deadline, budget.deadline)
    while True:
        # Short waits, so that a cancel of the task stops the script within one of them.
        step = max(0.0, min(0.05, deadline - time.monotonic()))
        try:
            out, err = proc.communicate(timeout=step)
            return out, err, False
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline or (budget is not None and budget.cancelled()):
                out, err = _reap(proc)
                return out, err, True


def _reap(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    _kill_group(proc.pid)
    try:
        return proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        # Without a PID namespace a daemonized grandchild can hold the pipes open: stop reading.
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        return b"", b""


def _exit_code(status: dict[str, str], returncode: int) -> int:
    if "signal" in status:
        return -int(status["signal"])
    if "exit" in status:
        return int(status["exit"])
    return returncode


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _cut(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _outcome(code: int | None, timed_out: bool, stderr: str, too_much: bool) -> Outcome:
    if timed_out:
        return "timeout"
    if code == -signal.SIGXCPU:
        return "cpu_limit"
    if code is not None and code < 0:
        return "killed"
    # The interpreter turns a refused allocation or fork into these exceptions before exiting.
    if "MemoryError" in stderr:
        return "memory_limit"
    if "BlockingIOError: [Errno 11]" in stderr:
        return "process_limit"
    if code != 0:
        return "error"
    return "output_limit" if too_much else "ok"
