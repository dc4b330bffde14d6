"""`Replica`: the Ray actor that holds one engine and pulls jobs of its model from the queue.

The job loop (`JobRunner`) runs in a thread of its own with its own event loop, started by
`__init__`. That matters for restarts: when the process dies (a broken engine calls `os._exit`, or
someone kills it), Ray runs `__init__` again in a fresh process and the loop starts by itself, with
no caller having to remember to call a `run` method. Actor methods (`info`, `stop`) answer from
Ray's own thread while a job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
import redis
import redis.asyncio as aioredis

from blockpress.agents.builtins import http_get_tool
from blockpress.runtime.queue.jobqueue import Claim, JobQueue
from blockpress.runtime.tracing.telemetry import setup_tracing
from blockpress.workers.agent_job import default_registry
from blockpress.workers.faults import FaultInjector
from blockpress.workers.ledger import RedisLedger
from blockpress.workers.runner import JobRunner
from blockpress.workers.traced import TracedEngine

__all__ = ["NODE_KIND_LABEL", "Replica", "engine_options"]

NODE_KIND_LABEL = "node-kind"
"""The Ray node label naming a node's kind: `ray start --labels node-kind=...`, a KubeRay group's `labels`."""

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=0)
class Replica:
    """One engine pulling jobs of its model; the pool sets `num_gpus` and the actor's name.

    Args:
        model_path: checkpoint directory or hub id.
        replica_id: the consumer name in the model's consumer group; stable across restarts.
        redis_url: the queue's Redis.
        queue_options: keyword arguments of `JobQueue` (lease_s, max_deliveries, ...).
        device, dtype: passed to `DiffusionEngine.from_pretrained`.
        torch_threads: intra-op threads for a CPU engine; None leaves torch's default.
        max_sessions: engine sessions (KV caches) kept for client `session_id`s, least recently used
            dropped first.
        metrics_port: serve Prometheus `/metrics` of this replica on this port (0: any free port,
            which `info()["metrics_port"]` then names); None serves none.
        metrics_host: the interface `/metrics` binds; None (default): this Ray node's address.
        agent_pin: a `blockpress.workers.agent_model.TemplatePolicy` as `module:function` (for
            example `blockpress.workers.agent_model:pin_tool_call_skeleton`): text pinned at the start
            of agent turns. None pins nothing.
        http_allowed_hosts: host names the agents' `http_get` tool may fetch from; empty: no `http_get`.
        trace_retention_s: how long the trace store keeps this replica's spans; None: its default.
        faults: fault hooks for the job loop, installed by fault tests only; None makes no checks.
        quantization: `nf4` or `fp8` packed weights (`DiffusionEngine.from_pretrained`); None: `dtype`.
        node_kinds: engine options (`device`, `dtype`, `quantization`) by node kind; the entry of the
            node this actor lands on (its Ray label `node-kind`) overrides `device` and `dtype`.
    """

    def __init__(
        self,
        model_path: str,
        *,
        replica_id: str,
        redis_url: str,
        queue_options: dict[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int | None = None,
        max_sessions: int = 8,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        agent_pin: str | None = None,
        http_allowed_hosts: Sequence[str] = (),
        trace_retention_s: float | None = None,
        faults: FaultInjector | None = None,
        node_kinds: Mapping[str, Mapping[str, Any]] | None = None,
        quantization: str | None = None,
    ) -> None:
        from blockpress.workers.engine import DiffusionEngine  # torch: loaded in the actor, not by the pool

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.replica_id = replica_id
        self.started_at = time.time()
        # Resolved where the actor landed, not where the pool asked: after a node loss Ray restarts
        # this actor on whichever matching node has room, and that node's kind decides the options.
        node_kind, options = engine_options(node_kinds, device=device, dtype=dtype, quantization=quantization)
        engine = DiffusionEngine.from_pretrained(model_path, **options)
        self.model = engine.model_name
        self.engine_info = {
            "node_kind": node_kind,
            "node_id": ray.get_runtime_context().get_node_id(),
            "precision": engine.precision,  # the quantization, else the dtype: what the kind asked for
            "model": engine.model_name,
            "context_length": engine.context_length,
            "canvas_length": engine.canvas_length,
            "dtype": engine.dtype,
            "device": engine.device,
        }
        # This actor is its own process: its spans go to the trace store beside the queue (and to
        # OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set).
        retention = {} if trace_retention_s is None else {"retention_s": trace_retention_s}
        setup_tracing("blockpress-replica", redis_url=redis_url, **retention)
        self._engine = TracedEngine(engine)
        # The model, torch and transformers leave ~0.4 million long-lived objects that every full
        # collection would walk again (226 ms on the development machine, a pause inside some job);
        # frozen, a collection walks only what the jobs made since. Collected first, so no garbage
        # of the loading is frozen with them.
        gc.collect()
        gc.freeze()
        self._faults = faults
        self._agent_options = _agent_options(agent_pin, http_allowed_hosts)
        self.metrics_port: int | None = None
        if metrics_port is not None:
            from blockpress.runtime.metrics import start_metrics_server

            # Ray's node address, not 0.0.0.0: loopback under `serve` (its Ray stays on 127.0.0.1),
            # the pod's address in a cluster, where the scraper reaches it as it reaches Ray.
            host = metrics_host or ray.util.get_node_ip_address()
            self.metrics_port = int(start_metrics_server(metrics_port, host=host).server_port)
        self._max_sessions = max_sessions
        self._redis_url = redis_url
        self._queue_options = dict(queue_options or {})
        self._runner: JobRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"replica-{replica_id}", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:
            log.exception("replica %s: job loop died", self.replica_id)
        if self._stop is None or not self._stop.is_set():
            # The loop ended without being asked to: restart the whole actor rather than idle.
            os._exit(75)

    async def _main(self) -> None:
        client = aioredis.Redis.from_url(self._redis_url, socket_connect_timeout=2.0, health_check_interval=10)
        sync_client = redis.Redis.from_url(self._redis_url, socket_connect_timeout=2.0)
        try:
            queue = JobQueue(client, **self._queue_options)
            self._runner = JobRunner(
                self._engine,
                queue,
                model=self.model,
                replica_id=self.replica_id,
                agent_options=_per_claim(self._agent_options, sync_client, queue),
                max_sessions=self._max_sessions,
                faults=self._faults,
            )
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._runner.run(self._stop)
        finally:
            await client.aclose()
            sync_client.close()

    def info(self) -> dict[str, Any]:
        """Who and how this replica is: id, pid, engine facts, jobs done, the job in hand."""
        runner = self._runner
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "running": self._thread.is_alive(),
            "jobs_done": runner.jobs_done if runner else 0,
            "current_job": runner.current if runner else None,
            "metrics_port": self.metrics_port,
            **self.engine_info,
        }

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stops claiming jobs, lets the job in hand finish, and returns whether the loop ended in time."""
        # Asked again once the loop has ended (a pool polls a draining replica): its loop is closed.
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def engine_options(
    node_kinds: Mapping[str, Mapping[str, Any]] | None, *, device: str, dtype: str, quantization: str | None = None
) -> tuple[str | None, dict[str, Any]]:
    """This node's kind (its Ray label `node-kind`) and the engine options it gets there."""
    labels = ray.get_runtime_context().get_node_labels()
    kind: Any = labels.get(NODE_KIND_LABEL)
    if isinstance(kind, list):  # typed as a list of values in Ray's stubs, a plain string at run time
        kind = kind[0] if kind else None
    options: dict[str, Any] = {"device": device, "dtype": dtype, "quantization": quantization}
    given = (node_kinds or {}).get(kind or "", {})
    options.update({key: value for key, value in given.items() if value is not None})
    return (str(kind) if kind else None), options


def _agent_options(pin: str | None, http_allowed_hosts: Sequence[str] = ()) -> dict[str, Any]:
    """What every agent job of this replica shares: the tool registry and the pin policy.

    The registry (built-ins and the `blockpress.tools` entry points) is loaded here, when the replica
    starts, so that a plugin that fails to import stops the replica at once with its name rather than
    failing its first agent job.
    """
    registry = default_registry()
    if http_allowed_hosts:  # off unless the operator allowed some hosts, as `builtin_tools` has it
        registry.register(http_get_tool(http_allowed_hosts))
    options: dict[str, Any] = {"registry": registry}
    if pin:
        module, _, name = pin.partition(":")
        options["pin"] = getattr(importlib.import_module(module), name)
    return options


def _per_claim(shared: dict[str, Any], client: redis.Redis, queue: JobQueue) -> Callable[[Claim], dict[str, Any]]:
    """Agent jobs record their turns in Redis, fenced by attempt, so a redelivery resumes them."""
    return lambda claim: {**shared, "ledger": RedisLedger(client, claim.job_id, claim.attempt, keys=queue.keys)}
