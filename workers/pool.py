"""`ReplicaPool`: the replicas of one model, kept alive, placed by node kind, resized on demand.

Ray restarts a replica whose process dies (`max_restarts=-1`), and the restarted actor resumes pulling
jobs by itself. The pool covers what Ray does not: an actor that is dead for good (killed without
restart, its node lost, its constructor failing) is replaced by a new one under the same replica id,
so the model keeps its N consumers. `check()` does one round; `watch()` runs it in a thread.

Placement: replicas ask Ray for a node whose `node-kind` label is one of `placement` (a label selector),
so on KubeRay an actor that finds no such node with room waits, and the autoscaler adds a pod of a
group that carries the label. `scale_to(n)` grows at once and shrinks by draining: a replica leaving
the pool stops claiming, finishes the job in hand, and only then is its actor ended (by `check()`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from blockpress.workers.faults import FaultInjector
from blockpress.workers.replica import NODE_KIND_LABEL, Replica

__all__ = ["ReplicaPool"]

log = logging.getLogger(__name__)


class ReplicaPool:
    """The replicas of one model.

    Args:
        model_path: checkpoint directory or hub id; the model's name is its last path part.
        replicas: how many replicas to start with.
        redis_url: the queue's Redis.
        queue_options: `JobQueue` keyword arguments every replica uses (lease_s, max_deliveries, ...).
        device, dtype: engine placement; with `device` other than "cpu" and a GPU in the cluster, each
            replica asks Ray for one GPU (see `num_gpus`).
        env: environment variables of the replicas' processes (e.g. `PYTHONPATH` for tool plugins).
        name_prefix: actor names are `<prefix><model>-<i>`.
        torch_threads: intra-op threads per CPU replica; None leaves torch's default.
        max_sessions: client sessions (KV caches) each replica keeps, least recently used dropped.
        metrics_port: each replica serves Prometheus `/metrics` on this port; 0 picks a free port per
            replica (several replicas share a machine), see `infos()`. None (default) serves none.
        agent_pin: the pin policy of agent turns, as `module:function` (see `Replica`).
        http_allowed_hosts: host names the agents' `http_get` tool may fetch from; empty: no `http_get`.
        trace_retention_s: how long the trace store keeps the replicas' spans; None: its default.
        faults: fault hooks every replica's job loop calls, for fault tests (e.g.
            `blockpress.workers.testing.PromptFaults()`); None (default) makes no fault checks.
        placement: node kinds (`node-kind` labels) the replicas may run on; empty: any node.
        node_kinds: engine options by node kind (`RuntimeSettings.node_kinds` as plain dicts); each
            replica applies the entry of the node it lands on.
        quantization: `nf4` or `fp8` packed weights for every replica; a node kind's own entry wins.
        num_gpus: GPUs per replica; None: 1 when `device` is not cpu and the cluster has a GPU now.
    """

    def __init__(
        self,
        model_path: str,
        replicas: int,
        *,
        redis_url: str,
        queue_options: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        env: Mapping[str, str] | None = None,
        name_prefix: str = "blockpress-",
        torch_threads: int | None = None,
        max_sessions: int = 8,
        metrics_port: int | None = None,
        agent_pin: str | None = None,
        http_allowed_hosts: Sequence[str] = (),
        trace_retention_s: float | None = None,
        faults: FaultInjector | None = None,
        placement: Sequence[str] = (),
        node_kinds: Mapping[str, Mapping[str, Any]] | None = None,
        num_gpus: float | None = None,
        quantization: str | None = None,
    ) -> None:
        from blockpress.runtime.config import model_name

        self.model_path = model_path
        self.model = model_name(model_path)
        self._initial = replicas
        self._kwargs = {
            "redis_url": redis_url,
            "queue_options": dict(queue_options or {}),
            "device": device,
            "dtype": dtype,
            "quantization": quantization,
            "torch_threads": torch_threads,
            "max_sessions": max_sessions,
            "metrics_port": metrics_port,
            "agent_pin": agent_pin,
            "http_allowed_hosts": tuple(http_allowed_hosts),
            "trace_retention_s": trace_retention_s,
            "faults": faults,
            "node_kinds": {kind: dict(options) for kind, options in (node_kinds or {}).items()},
        }
        self.placement = tuple(placement)
        self._num_gpus = num_gpus
        self._env = dict(env or {})
        self._prefix = name_prefix
        self._actors: dict[str, Any] = {}
        self._draining: dict[str, Any] = {}
        # The watcher thread and the autoscaler both change the actor tables.
        self._lock = threading.RLock()
        self.replaced = 0
        """Actors this pool replaced because they were dead for good."""
        self.drained = 0
        """Replicas that left the pool after finishing their work (scale-down)."""
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def size(self) -> int:
        """Replicas in the pool, not counting those draining out of it."""
        return len(self._actors)

    @property
    def draining(self) -> int:
        """Replicas finishing their job in hand before they end."""
        return len(self._draining)

    def replica_ids(self) -> list[str]:
        return sorted(self._actors, key=self._index)

    def _index(self, replica_id: str) -> int:
        return int(replica_id.rsplit("-", 1)[1])

    def _actor_options(self, replica_id: str) -> dict[str, Any]:
        gpus = self._num_gpus
        if gpus is None:
            gpus = 1 if self._kwargs["device"] != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        options: dict[str, Any] = {"name": replica_id, "num_gpus": gpus, "num_cpus": 0}
        if self.placement:
            options["label_selector"] = {NODE_KIND_LABEL: f"in({','.join(self.placement)})"}
        if self._env:
            options["runtime_env"] = {"env_vars": self._env}
        return options

    def _spawn(self, replica_id: str) -> Any:
        options = self._actor_options(replica_id)
        return Replica.options(**options).remote(self.model_path, replica_id=replica_id, **self._kwargs)  # type: ignore[attr-defined]

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Starts the replicas and waits until each has loaded its engine."""
        self.scale_to(self._initial)
        self.infos(timeout_s=timeout_s)

    def infos(self, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Each replica's `info()`; raises if one does not answer within `timeout_s`."""
        with self._lock:
            actors = [self._actors[i] for i in self.replica_ids()]
        return list(ray.get([a.info.remote() for a in actors], timeout=timeout_s))

    def actor(self, replica_id: str) -> Any:
        return self._actors[replica_id]

    def scale_to(self, n: int) -> int:
        """Makes the pool `n` replicas: new ones start now, surplus ones drain; returns the change.

        The replicas that leave are the idle ones first (then the newest), and each finishes the job
        in hand: it stops claiming at once and is ended by a later `check()` once its loop has ended.
        """
        with self._lock:
            change = n - len(self._actors)
            taken = set(self._actors) | set(self._draining)
            i = 0
            while len(self._actors) < n:
                replica_id = f"{self._prefix}{self.model}-{i}"
                if replica_id not in taken:
                    self._actors[replica_id] = self._spawn(replica_id)
                i += 1
            if len(self._actors) > n:
                for replica_id in self._drain_order()[: len(self._actors) - n]:
                    actor = self._actors.pop(replica_id)
                    actor.stop.remote(0)  # returns at once; the loop ends after the job in hand
                    self._draining[replica_id] = actor
                    log.info("replica %s draining (pool of %s shrinks to %d)", replica_id, self.model, n)
            return change

    def _drain_order(self) -> list[str]:
        """Replica ids, idle ones first, newest first within each: who leaves on a scale-down."""
        ids = self.replica_ids()
        refs = {i: self._actors[i].info.remote() for i in ids}
        busy: dict[str, bool] = {}
        for replica_id, ref in refs.items():
            try:
                busy[replica_id] = ray.get(ref, timeout=5.0)["current_job"] is not None
            except Exception:  # loading, restarting or gone: treat as busy, so idle ones leave first
                busy[replica_id] = True
        return sorted(ids, key=lambda i: (busy[i], -self._index(i)))

    def check(self, *, timeout_s: float = 5.0) -> int:
        """Replaces every replica that is dead for good and ends drained ones; returns how many were replaced.

        A replica Ray is restarting does not count as dead: it comes back on its own.
        """
        replaced = 0
        with self._lock:
            for replica_id, actor in list(self._actors.items()):
                try:
                    ray.get(actor.info.remote(), timeout=timeout_s)
                except (GetTimeoutError, ActorUnavailableError):
                    continue  # busy loading or restarting
                except RayActorError as exc:
                    log.warning("replica %s is dead (%s); starting a new one", replica_id, exc)
                    self._actors[replica_id] = self._spawn(replica_id)
                    replaced += 1
            for replica_id, actor in list(self._draining.items()):
                try:
                    # Asked again each round: an actor Ray restarted while draining has a fresh loop.
                    ended = ray.get(actor.stop.remote(0), timeout=timeout_s)
                except (GetTimeoutError, ActorUnavailableError):
                    continue
                except RayActorError:
                    ended = True  # gone already; its job's lease lapses and another replica takes it
                if ended:
                    ray.kill(actor, no_restart=True)
                    del self._draining[replica_id]
                    self.drained += 1
                    log.info("replica %s drained and stopped", replica_id)
        self.replaced += replaced
        return replaced

    def watch(self, interval_s: float = 5.0) -> None:
        """Runs `check()` every `interval_s` in a daemon thread until `stop()`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check()
                except Exception:  # the watcher must outlive one bad round
                    log.exception("replica pool check failed")

        self._watcher = threading.Thread(target=loop, name=f"pool-{self.model}", daemon=True)
        self._watcher.start()

    def stop(self, *, drain_s: float = 30.0) -> None:
        """Lets each replica finish the job in hand (up to `drain_s`), then ends the actors."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            actors = [*self._actors.values(), *self._draining.values()]
            self._actors.clear()
            self._draining.clear()
        pending = [a.stop.remote(drain_s) for a in actors]
        try:
            ray.get(pending, timeout=drain_s + 5)
        except Exception as exc:  # a dead or stuck replica must not keep the others alive
            log.warning("replica pool drain incomplete: %s", exc)
        for actor in actors:
            ray.kill(actor, no_restart=True)

    def __enter__(self) -> ReplicaPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
