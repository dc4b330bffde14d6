"""Warm tool processes: each runs one tool call at a time, is reused while calls end well, and is
killed and replaced once a call overruns, crashes, runs out of memory or leaves anything behind.

Starting a fresh interpreter per call cost about 0.12 s, far more than the calls an agent makes
(a calculator call takes microseconds). A warm process pays that once, and a spare is kept warm
beside it so that the call after a kill does not pay it either; a call is then one pickled request
and one reply over its pipes (about 0.1 ms, `bench/tool_calls.py`). The bounds hold as before: the
caller SIGKILLs the process's whole group at the budget, the tool runs under RLIMIT_AS and
RLIMIT_CPU set around each call, and the process dies with the caller (PR_SET_PDEATHSIG). What a
reused process keeps between calls is module state, as any in-process tool does; a call that
leaves a thread or a child process running retires the process, so nothing of one call runs on
into the next.

Processes are started, reaped and replaced by one daemon thread: the parent-death signal is tied
to the thread that started a process, and this one lives as long as the caller does.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import math
import os
import pickle
import queue
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from blockpress.agents.errors import ToolFailed

__all__ = ["run_bounded", "run_in_worker"]

_log = logging.getLogger(__name__)
_POLL_S = 0.01
"""How often a caller waiting on a reply looks at its budget and cancel flag."""
_MAX_IDLE = 2
"""Warm processes kept per caller process: the one calls use and a spare to replace it at once."""
_READY_TIMEOUT_S = 60.0
_HEADER = struct.Struct(">Q")

Reply = tuple[str, Any]
"""("ok", value), or ("failed" | "error", the message the model sees)."""

# The worker's program. It dies with the thread that started it, exits if that already happened,
# keeps private copies of its pipes (fd 0 and 1 then point elsewhere, so a tool that reads stdin
# or print()s cannot corrupt a frame) and serves calls until its stdin closes.
_PROGRAM = r"""
import os, sys
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(0)
requests, replies = os.dup(0), os.dup(1)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)
sys.path[:] = sys.argv[2].split(os.pathsep)
from blockpress.agents.toolworker import _serve
_serve(requests, replies, sys.argv[3].split(",") if sys.argv[3] else [])
"""


def run_bounded(fn: Callable[..., Any], kwargs: dict[str, Any], memory_bytes: int, cpu_s: int) -> tuple[Reply, bool]:
    """Runs `fn(**kwargs)` under soft RLIMIT_AS and RLIMIT_CPU; returns the reply and whether the
    process must not serve another call (it ran out of memory, or left threads or children).

    The limits are soft and restored afterwards, so the next call (and unpickling it) starts from
    the process's own limits; CPU time is cumulative, so the CPU limit counts from what was used.
    """
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_soft = math.ceil(used.ru_utime + used.ru_stime) + cpu_s
    old_as, old_cpu = resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU)
    retire = False
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_capped(memory_bytes, old_as[1]), old_as[1]))
        resource.setrlimit(resource.RLIMIT_CPU, (_capped(cpu_soft, old_cpu[1]), old_cpu[1]))
        reply: Reply = ("ok", fn(**kwargs))
    except ToolFailed as exc:
        reply = ("failed", str(exc))
    except MemoryError:
        reply, retire = ("failed", f"the tool ran out of its {memory_bytes // 2**20} MiB of memory"), True
    except BaseException as exc:  # the caller turns it into the model's error message
        reply = ("error", f"{type(exc).__name__}: {exc}")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old_as)
        resource.setrlimit(resource.RLIMIT_CPU, old_cpu)
    return reply, retire


def _capped(value: int, hard: int) -> int:
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _leftovers() -> bool:
    """Whether the last call left a thread or a child process of this process running."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = threading.active_count()
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return threads > 1
    return True


def _serve(requests: int, replies: int, modules: list[str]) -> None:
    """The worker's loop: a frame (sys.path or None, pickled call) in, a (reply, retire) frame out.

    `modules` (those of the tools called so far) are imported before the worker says it is ready,
    so that a replacement is warm for them too; one that fails to import fails its calls instead.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for module in modules:
        with contextlib.suppress(BaseException):
            importlib.import_module(module)
    _write_frame(replies, b"ready")
    while (frame := _read_frame(requests)) is not None:
        paths, payload = pickle.loads(frame)
        if paths is not None:
            sys.path[:] = paths
        try:
            fn, kwargs, memory_bytes, cpu_s = pickle.loads(payload)
        except BaseException as exc:  # the tool's module does not import here
            reply, retire = ("error", f"the tool cannot be loaded in its process: {type(exc).__name__}: {exc}"), False
        else:
            reply, retire = run_bounded(fn, kwargs, memory_bytes, cpu_s)
            del fn, kwargs
        try:
            out = pickle.dumps((reply, retire or _leftovers()))
        except Exception as exc:  # an unpicklable result
            out = pickle.dumps((("error", f"the tool's result cannot be returned: {exc}"), False))
        _write_frame(replies, out)
    os._exit(0)


def _write_frame(fd: int, data: bytes) -> None:
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_frame(fd: int) -> bytes | None:
    """One frame, or None at end of file."""
    head = _read_exact(fd, _HEADER.size)
    return None if head is None else _read_exact(fd, _HEADER.unpack(head)[0])


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Worker:
    def __init__(self, modules: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROGRAM, str(os.getpid()), os.pathsep.join(sys.path), ",".join(modules)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: one kill takes whatever the tool started
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.requests, self.replies = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.paths = list(sys.path)
        ready, _, _ = select.select([self.replies], [], [], _READY_TIMEOUT_S)
        if not ready or _read_frame(self.replies) != b"ready":
            self.kill()
            self.reap()
            raise OSError(f"the tool process did not start ({_how(self.proc.returncode)})")

    def send(self, payload: bytes) -> None:
        paths = None if self.paths == sys.path else list(sys.path)
        _write_frame(self.requests, pickle.dumps((paths, payload)))
        self.paths = list(sys.path)

    def receive(self, deadline: float, stopped: Callable[[], str | None]) -> tuple[Reply, bool]:
        while not select.select([self.replies], [], [], max(0.0, min(_POLL_S, deadline - time.monotonic())))[0]:
            if (why := stopped()) is not None:
                raise ToolFailed(why)
        raw = _read_frame(self.replies)
        if raw is None:
            self.kill()  # what the dead worker started goes with it
            self.proc.wait()
            raise ToolFailed(f"the tool's process died ({_how(self.proc.returncode)}) before it returned")
        reply, retire = pickle.loads(raw)
        return reply, retire

    def kill(self) -> None:
        # The whole group (whatever the tool started dies too), and only before the reap: once
        # reaped, the group's id could name someone else's processes.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def reap(self) -> None:
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class _Pool:
    """The warm workers of this process; spawns and reaps run on one daemon thread."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._starting = 0
        self._error: str | None = None
        self._cond = threading.Condition()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.modules: dict[str, None] = {}
        """Modules of the tools called so far, in order: what a new worker imports before it is ready."""

    def acquire(self, deadline: float, stopped: Callable[[], str | None]) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.proc.poll() is None:
                        if not self._idle and self._starting == 0:
                            # A spare: the call after one that kills its worker must not wait for a start.
                            self._starting += 1
                            self._submit(self._start)
                        return worker
                    self._submit(worker.reap)
                if self._starting == 0:
                    if self._error is not None:
                        error, self._error = self._error, None
                        raise ToolFailed(f"the tool's process could not be started: {error}")
                    self._starting += 1
                    self._submit(self._start)
                self._cond.wait(timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
                if (why := stopped()) is not None:
                    raise ToolFailed(why)

    def release(self, worker: _Worker) -> None:
        with self._cond:
            if len(self._idle) < _MAX_IDLE:
                self._idle.append(worker)
                self._cond.notify()
                return
        self.discard(worker, replace=False)

    def discard(self, worker: _Worker, *, replace: bool = True) -> None:
        """Kills `worker` now; reaps it and, with `replace`, warms a successor in the background."""
        worker.kill()
        self._submit(worker.reap)
        if replace:
            with self._cond:
                if self._idle or self._starting:
                    return
                self._starting += 1
            self._submit(self._start)

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()
            worker.reap()

    def _start(self) -> None:
        try:
            worker = _Worker(list(self.modules))
        except Exception as exc:
            _log.warning("a tool process did not start: %s", exc)
            with self._cond:
                self._starting -= 1
                self._error = str(exc)
                self._cond.notify_all()
            return
        with self._cond:
            self._starting -= 1
            self._error = None
        self.release(worker)

    def _submit(self, job: Callable[[], None]) -> None:
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run_jobs, name="blockpress-tool-workers", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # one bad reap must not stop later spawns
                _log.exception("tool process housekeeping failed")


_POOL = _Pool()
atexit.register(lambda: _POOL.close())


def _reset_after_fork() -> None:
    # A forked child must not share its parent's workers (or wait on its parent's spawner thread).
    global _POOL
    _POOL = _Pool()


os.register_at_fork(after_in_child=_reset_after_fork)


def run_in_worker(payload: bytes, *, module: str | None, deadline: float, stopped: Callable[[], str | None]) -> Reply:
    """Runs the pickled call (fn, kwargs, memory_bytes, cpu_s) in a warm worker.

    `module` is the tool's module, which workers started from now on import ahead of calls.

    Raises:
        ToolFailed: `stopped()` gave a reason (the worker is then killed) before the reply came
            or while a worker started, the worker died, or none could be started.
    """
    if module and module not in _POOL.modules and module != "__main__":
        _POOL.modules[module] = None
    for attempt in range(2):
        worker = _POOL.acquire(deadline, stopped)
        try:
            worker.send(payload)
            break
        except OSError:
            # It died while idle, before it read the call: the tool never ran, so another may run it.
            _POOL.discard(worker)
            if attempt:
                raise ToolFailed("the tool's process died before it took the call") from None
    try:
        reply, retire = worker.receive(deadline, stopped)
    except BaseException:
        _POOL.discard(worker)
        raise
    if retire:
        _POOL.discard(worker)
    else:
        _POOL.release(worker)
    return reply


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return {9: "killed", 24: "past its CPU limit"}.get(-exitcode, f"signal {-exitcode}")
    return f"exit status {exitcode}"
