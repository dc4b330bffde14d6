"""The embedded runtime of `blockpress serve`: an owned redis-server, a local Ray, replicas, a gateway.

Whatever this module starts it also stops, in reverse order: the gateway drains, the replicas finish
the job in hand, Ray shuts down, and redis-server exits after writing its append-only file, so jobs
accepted before a restart are still there after it. Parts given from outside (`redis_url`,
`ray_address`) are used, never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import ConfigurationError

__all__ = ["OwnedRedis", "default_models", "embedded_runtime", "replica_options", "start_ray"]

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
    """A redis-server this process starts and stops, append-only file on, data in `data_dir`.

    Args:
        data_dir: where the append-only file lives; the same directory on the next start brings the
            queued jobs back.
        port: TCP port on 127.0.0.1; 0 picks a free one.
    """

    def __init__(self, data_dir: Path, *, port: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout_s: float = 10.0) -> str:
        """Starts redis-server and waits until it answers; returns its URL."""
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
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        give_up = time.monotonic() + timeout_s
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise ConfigurationError(
                        f"redis-server exited at start (code {self.process.returncode}); see {redis_dir}/redis.log"
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
        return self.url

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM makes redis-server flush its append-only file and exit; kill only if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("stopped redis-server")

    def __enter__(self) -> OwnedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_ray(address: str | None) -> bool:
    """Connects to `address`, or starts a local Ray; returns whether this process started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def default_models(settings: RuntimeSettings) -> tuple[str, ...]:
    """The models to serve: the configured ones, else the shipped tiny checkpoint.

    An install that lost the package data (a source tree copied without its .safetensors) gets a
    random-weight checkpoint of the same class built in the data dir instead, and a warning says so.
    """
    from blockpress.workers.checkpoints import TINY_CALCULATOR

    if settings.models:
        return settings.models
    if (TINY_CALCULATOR / "config.json").is_file():
        return (str(TINY_CALCULATOR),)
    fallback = settings.data_dir / "checkpoints" / "tiny-random"
    if not (fallback / "config.json").is_file():
        from blockpress.workers.testing import build_tiny_checkpoint

        build_tiny_checkpoint(fallback)
    log.warning(
        "the shipped checkpoint %s is missing; serving a random-weight tiny checkpoint built in %s (its text is noise)",
        TINY_CALCULATOR,
        fallback,
    )
    return (str(fallback),)


def replica_options(settings: RuntimeSettings) -> dict[str, Any]:
    """The `ReplicaPool` keyword arguments `settings` determine, besides the model and the Redis URL."""
    return {
        "queue_options": {"lease_s": settings.lease_s, "max_deliveries": settings.max_deliveries},
        "device": settings.device,
        "dtype": settings.dtype,
        "max_sessions": settings.replica_max_sessions,
        "torch_threads": settings.replica_torch_threads,
        "agent_pin": settings.agent_pin,
        "metrics_port": settings.replica_metrics_port,
        "http_allowed_hosts": settings.agent_http_allowed_hosts,
        "trace_retention_s": settings.trace_retention_s,
    }


def server_tools(settings: RuntimeSettings) -> list[str]:
    """The server-side tools a replica started with `settings` offers, for the gateway to check tasks."""
    from blockpress.agents.builtins import installed_tool_names

    return installed_tool_names(http_get=bool(settings.agent_http_allowed_hosts))


@contextlib.asynccontextmanager
async def embedded_runtime(
    settings: RuntimeSettings, *, models: Sequence[str] | None = None, pool_options: dict[str, Any] | None = None
) -> AsyncIterator[Any]:
    """Runs Redis (owned unless `settings.redis_url`), Ray, one pool per model and the gateway.

    Yields the started `Gateway`; leaving the block drains and stops everything this started.
    """
    from blockpress.runtime.gateway.cards import load_model_card
    from blockpress.runtime.gateway.server import Gateway
    from blockpress.workers.pool import ReplicaPool

    paths = tuple(models) if models is not None else await asyncio.to_thread(default_models, settings)
    async with contextlib.AsyncExitStack() as stack:
        redis_url = settings.redis_url
        if redis_url is None:
            owned = OwnedRedis(settings.data_dir)
            redis_url = await asyncio.to_thread(owned.start)
            stack.callback(owned.stop)
        settings = settings.model_copy(update={"redis_url": redis_url})
        from blockpress.runtime.tracing.telemetry import setup_tracing

        setup_tracing("blockpress-gateway", redis_url=redis_url, retention_s=settings.trace_retention_s)
        # In this thread: Ray installs its signal handlers only from the main thread.
        if start_ray(settings.ray_address):
            import ray

            stack.callback(ray.shutdown)
        options = {**replica_options(settings), **(pool_options or {})}
        for path in paths:
            pool = ReplicaPool(path, settings.replicas, redis_url=redis_url, **options)
            await asyncio.to_thread(pool.start)
            pool.watch()
            stack.callback(pool.stop, drain_s=settings.drain_s)
        cards = {}
        for path in paths:
            card = await asyncio.to_thread(load_model_card, path)
            cards[card.name] = card
        gateway = Gateway.from_settings(settings, cards, agent_tools=server_tools(settings))
        await gateway.start()
        stack.push_async_callback(gateway.queue.redis.aclose)
        stack.push_async_callback(gateway.stop)
        yield gateway
