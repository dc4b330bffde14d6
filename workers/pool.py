"""`ReplicaPool`: the configured number of `Replica` actors for one model, kept alive.

Ray restarts a replica whose process dies (`max_restarts=-1`), and the restarted actor resumes pulling
jobs by itself. The pool covers what Ray does not: an actor that is dead for good (killed without
restart, its node lost, its constructor failing) is replaced by a new one under the same replica id,
so the model keeps its N consumers. `check()` does one round; `watch()` runs it in a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from blockpress.workers.faults import FaultInjector
from blockpress.workers.replica import Replica

__all__ = ["ReplicaPool"]

log = logging.getLogger(__name__)


class ReplicaPool:
    """N replicas of one model.

    Args:
        model_path: checkpoint directory or hub id; the model's name is its last path part.
        replicas: how many replicas to keep.
        redis_url: the queue's Redis.
        queue_options: `JobQueue` keyword arguments every replica uses (lease_s, max_deliveries, ...).
        device, dtype: engine placement; with `device` other than "cpu" and a GPU in the cluster, each
            replica asks Ray for one GPU.
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
    ) -> None:
        from blockpress.runtime.config import model_name

        self.model_path = model_path
        self.model = model_name(model_path)
        self.size = replicas
        self._kwargs = {
            "redis_url": redis_url,
            "queue_options": dict(queue_options or {}),
            "device": device,
            "dtype": dtype,
            "torch_threads": torch_threads,
            "max_sessions": max_sessions,
            "metrics_port": metrics_port,
            "agent_pin": agent_pin,
            "http_allowed_hosts": tuple(http_allowed_hosts),
            "trace_retention_s": trace_retention_s,
            "faults": faults,
        }
        self._env = dict(env or {})
        self._prefix = name_prefix
        self._actors: dict[str, Any] = {}
        self.replaced = 0
        """Actors this pool replaced because they were dead for good."""
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def replica_ids(self) -> list[str]:
        return [f"{self._prefix}{self.model}-{i}" for i in range(self.size)]

    def _spawn(self, replica_id: str) -> Any:
        gpus = 1 if self._kwargs["device"] != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        options: dict[str, Any] = {"name": replica_id, "num_gpus": gpus, "num_cpus": 0}
        if self._env:
            options["runtime_env"] = {"env_vars": self._env}
        return Replica.options(**options).remote(self.model_path, replica_id=replica_id, **self._kwargs)  # type: ignore[attr-defined]

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Starts the replicas and waits until each has loaded its engine."""
        for replica_id in self.replica_ids():
            self._actors[replica_id] = self._spawn(replica_id)
        self.infos(timeout_s=timeout_s)

    def infos(self, *, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Each replica's `info()`; raises if one does not answer within `timeout_s`."""
        return list(ray.get([a.info.remote() for a in self._actors.values()], timeout=timeout_s))

    def actor(self, replica_id: str) -> Any:
        return self._actors[replica_id]

    def check(self, *, timeout_s: float = 5.0) -> int:
        """Replaces every replica that is dead for good; returns how many were replaced.

        A replica Ray is restarting does not count as dead: it comes back on its own.
        """
        replaced = 0
        for replica_id, actor in list(self._actors.items()):
            try:
                ray.get(actor.info.remote(), timeout=timeout_s)
            except (GetTimeoutError, ActorUnavailableError):
                continue  # busy loading or restarting
            except RayActorError as exc:
                log.warning("replica %s is dead (%s); starting a new one", replica_id, exc)
                self._actors[replica_id] = self._spawn(replica_id)
                replaced += 1
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
        pending = [a.stop.remote(drain_s) for a in self._actors.values()]
        try:
            ray.get(pending, timeout=drain_s + 5)
        except Exception as exc:  # a dead or stuck replica must not keep the others alive
            log.warning("replica pool drain incomplete: %s", exc)
        for actor in self._actors.values():
            ray.kill(actor, no_restart=True)
        self._actors.clear()

    def __enter__(self) -> ReplicaPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
