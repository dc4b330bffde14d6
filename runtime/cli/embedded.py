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
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from blockpress.runtime.cli.ownedredis import OwnedRedis
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import ConfigurationError

__all__ = [
    "OwnedRedis",
    "default_models",
    "embedded_runtime",
    "model_placement",
    "ray_on_loopback",
    "replica_options",
    "scale_policy",
    "start_ray",
]

log = logging.getLogger(__name__)


def start_ray(address: str | None, **init_options: Any) -> bool:
    """Connects to `address`, or starts a local Ray on loopback; returns whether this process started it.

    `init_options` go to `ray.init` for a local Ray (tests pass `num_cpus`). Ray's token auth stays on.

    Raises:
        ConfigurationError: the local Ray took a node address other than loopback (a Ray that
            ignores `ray_on_loopback`); it is shut down rather than left listening on the network.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray_on_loopback()
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False, **init_options}
    ray.init(_node_ip_address="127.0.0.1", **options)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in ("127.0.0.1", "::1"):
        ray.shutdown()
        raise ConfigurationError(
            f"the local Ray took node address {node_ip}, not loopback, so its ports would be reachable from "
            "the network; start Ray yourself (`ray start --head`) behind a firewall and pass --ray-address"
        )
    return True


_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_on_loopback() -> None:
    """Makes the Ray that this process starts next take 127.0.0.1 as its node address and listen there.

    Ray binds its servers (GCS, raylet, workers, agents) to the node address, and on Linux takes the
    machine's network address for it: even `_node_ip_address="127.0.0.1"` and `ray start
    --node-ip-address=127.0.0.1` are rewritten (`services.resolve_ip_for_localhost`). Its
    single-machine mode, the default on macOS and Windows (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
    ray-project/ray#19362), keeps every address on loopback and refuses other nodes. Ray reads the
    variable once, at import, and this process may have imported Ray already, so the read constant
    is set too; the environment carries the switch to the GCS, the raylet and the workers.
    """
    import ray._private.ray_constants as ray_constants

    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


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
        "quantization": settings.quantization,
        "max_sessions": settings.replica_max_sessions,
        "torch_threads": settings.replica_torch_threads,
        "agent_pin": settings.agent_pin,
        "metrics_port": settings.replica_metrics_port,
        "http_allowed_hosts": settings.agent_http_allowed_hosts,
        "trace_retention_s": settings.trace_retention_s,
        "node_kinds": {kind: options.model_dump(exclude_none=True) for kind, options in settings.node_kinds.items()},
        "num_gpus": settings.replica_num_gpus,
    }


def served_precision(settings: RuntimeSettings) -> str | None:
    """What `ListModels` reports as a model's precision when the replicas quantize its weights: the one
    `quantization`, or each node kind's (`fp8 on rtx-pro, nf4 on dgx-spark`); None: the checkpoint's dtype."""
    by_kind = {kind: o.quantization or settings.quantization for kind, o in settings.node_kinds.items()}
    if by_kind and len(set(by_kind.values())) > 1:
        return ", ".join(f"{q or settings.dtype} on {kind}" for kind, q in sorted(by_kind.items()))
    return next(iter(by_kind.values()), None) or settings.quantization


def model_placement(settings: RuntimeSettings, path: str) -> tuple[str, ...]:
    """The node kinds the replicas of the model at `path` may run on (`RuntimeSettings.placement`)."""
    from blockpress.runtime.config import model_name

    return settings.placement.get(model_name(path), settings.placement.get("*", ()))


def scale_policy(settings: RuntimeSettings) -> Any:
    """The autoscaling `ScalePolicy` of `settings`, or None when `max_replicas` is unset (fixed size)."""
    if settings.max_replicas is None:
        return None
    from blockpress.workers.autoscale import ScalePolicy

    minimum = settings.replicas if settings.min_replicas is None else settings.min_replicas
    return ScalePolicy(
        min_replicas=min(minimum, settings.max_replicas),
        max_replicas=settings.max_replicas,
        jobs_per_replica=settings.scale_jobs_per_replica,
        max_wait_s=settings.scale_max_wait_s,
        down_idle_s=settings.scale_down_idle_s,
    )


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
            placement = model_placement(settings, path)
            pool = ReplicaPool(path, settings.replicas, redis_url=redis_url, placement=placement, **options)
            await asyncio.to_thread(pool.start)
            pool.watch()
            stack.callback(pool.stop, drain_s=settings.drain_s)
        cards = {}
        for path in paths:
            card = await asyncio.to_thread(load_model_card, path, precision=served_precision(settings))
            cards[card.name] = card
        gateway = Gateway.from_settings(settings, cards, agent_tools=server_tools(settings))
        await gateway.start()
        stack.push_async_callback(gateway.queue.redis.aclose)
        stack.push_async_callback(gateway.stop)
        yield gateway


@contextlib.asynccontextmanager
async def cluster_pools(
    settings: RuntimeSettings, *, models: Sequence[str] | None = None, pool_options: dict[str, Any] | None = None
) -> AsyncIterator[tuple[list[Any], Any]]:
    """The `replicas` command: joins Ray, starts one pool per model and, with `max_replicas`, the autoscaler.

    Yields the started pools and the `QueueAutoscaler` (None at a fixed size); leaving the block stops
    the autoscaler, drains the pools, and shuts down Ray if this started it. Redis is never owned here.
    """
    import redis.asyncio as aioredis

    from blockpress.runtime.queue.jobqueue import JobQueue
    from blockpress.workers.autoscale import QueueAutoscaler
    from blockpress.workers.pool import ReplicaPool

    paths = tuple(models) if models is not None else await asyncio.to_thread(default_models, settings)
    redis_url = settings.redis_url_or_default()
    policy = scale_policy(settings)
    async with contextlib.AsyncExitStack() as stack:
        if start_ray(settings.ray_address):
            import ray

            stack.callback(ray.shutdown)
        options = {**replica_options(settings), **(pool_options or {})}
        pools = []
        for path in paths:
            size = settings.replicas
            if policy is not None:
                size = min(max(size, policy.min_replicas), policy.max_replicas)
            pool = ReplicaPool(path, size, redis_url=redis_url, placement=model_placement(settings, path), **options)
            # Registered before the start: a pool half started (some replicas placed) still drains.
            stack.callback(pool.stop, drain_s=settings.drain_s)
            # Replicas that wait for a node the KubeRay autoscaler has yet to add must not fail the
            # start, so with autoscaling on the pool starts without waiting for them.
            if policy is None:
                await asyncio.to_thread(pool.start)
            else:
                await asyncio.to_thread(pool.scale_to, size)
            pool.watch()
            pools.append(pool)
            log.info("replicas of %s: %d, on node kinds %s", pool.model, size, pool.placement or "any")
        scaler = None
        if policy is not None:
            client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2.0)
            stack.push_async_callback(client.aclose)
            scaler = QueueAutoscaler(JobQueue(client), pools, policy, interval_s=settings.scale_interval_s)
            if settings.pool_metrics_port is not None:
                from prometheus_client import start_http_server

                server, _ = start_http_server(settings.pool_metrics_port, registry=scaler.metrics.registry)
                stack.callback(server.server_close)
                stack.callback(server.shutdown)
            stop = asyncio.Event()
            task = asyncio.create_task(scaler.run(stop))
            stack.push_async_callback(_stop_task, stop, task)
        yield pools, scaler


async def _stop_task(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await task
