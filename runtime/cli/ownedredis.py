"""The redis-server that `blockpress serve` owns: started, watched and restarted, and stopped.

Split from `embedded.py` so that the embedded runtime's composition stays readable on its own.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from blockpress.runtime.contracts.errors import ConfigurationError

__all__ = ["REDIS_HINT", "OwnedRedis"]

log = logging.getLogger(__name__)

REDIS_HINT = (
    "redis-server is not installed; `blockpress serve` starts its own. Install it with "
    "`sudo apt-get install redis-server` (Debian/Ubuntu), `brew install redis` (macOS) or "
    "`make redis-server`, or pass --redis-url to use a running Redis."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnedRedis:
    """A redis-server this process starts, restarts when it dies, and stops; append-only file on.

    Args:
        data_dir: where the append-only file lives; the same directory on the next start brings the
            queued jobs back.
        port: TCP port on 127.0.0.1; 0 picks a free one.
    """

    _RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
    """Waits between restarts of a redis-server that keeps dying (the last one repeats)."""

    def __init__(self, data_dir: Path, *, port: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        """How often the watcher brought redis-server back after it died."""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout_s: float = 10.0) -> str:
        """Starts redis-server, waits until it answers, and watches it; returns its URL."""
        self._stopping.clear()
        self._launch(timeout_s)
        # Same port and data dir on a restart: clients reconnect to the URL they have, and the
        # append-only file brings back what was written (up to the last second, `appendfsync everysec`).
        self._watcher = threading.Thread(target=self._watch, name="owned-redis-watcher", daemon=True)
        self._watcher.start()
        return self.url

    def _launch(self, timeout_s: float) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigurationError(REDIS_HINT)
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(redis_dir.resolve()),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
            "--logfile", str((redis_dir / "redis.log").resolve()),
        ]  # fmt: skip
        with self._lock:
            if self._stopping.is_set():
                return
            self.process = process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        give_up = time.monotonic() + timeout_s
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if process.poll() is not None:
                    raise ConfigurationError(
                        f"redis-server exited at start (code {process.returncode}); see {redis_dir}/redis.log"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        break
                if time.monotonic() > give_up:
                    raise ConfigurationError(f"redis-server did not answer within {timeout_s:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()
        log.info("started redis-server on port %d (append-only file in %s)", self.port, redis_dir)

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            log.error("redis-server exited (code %s); restarting it on port %d", code, self.port)
            self._stopping.wait(self._RESTART_BACKOFF_S[min(failures, len(self._RESTART_BACKOFF_S) - 1)])
            try:
                self._launch(timeout_s=30.0)
            except ConfigurationError as exc:
                failures += 1
                log.error("restarting redis-server failed: %s", exc)
                continue
            failures = 0
            self.restarts += 1

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM makes redis-server flush its append-only file and exit; kill only if it hangs."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("stopped redis-server")
        if self._watcher is not None:
            self._watcher.join(timeout_s)

    def __enter__(self) -> OwnedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
