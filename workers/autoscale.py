"""Autoscaling on the queue: each model's replica count follows its queue's lag and oldest wait.

    decide()          the policy, a pure function of what the queue shows (unit-tested on its own)
    QueueAutoscaler   looks at every model's queue each interval and resizes its pool

Replicas pull work, so the queue is the whole truth about demand: jobs waiting (`JobQueue.depth`) and
how long the oldest has waited (`JobQueue.oldest_age`). The pool grows as soon as either is too high,
up to the maximum, and shrinks one replica at a time once the queue has stayed empty for a while,
down to the minimum; a replica that leaves finishes its job first (`ReplicaPool.scale_to` drains).
On Kubernetes a replica that finds no GPU waits, and the KubeRay autoscaler adds a pod for it; a
drained replica frees its GPU, and the idle pod goes after the group's idle timeout.

Every decision that changes a pool is a log line and a metric:

    blockpress_autoscale_replicas{model}               replicas in the pool (draining ones not counted)
    blockpress_autoscale_desired_replicas{model}       what the policy asked for on the last look
    blockpress_autoscale_queue_depth{model}            jobs waiting, as the autoscaler saw them
    blockpress_autoscale_oldest_wait_seconds{model}    the oldest waiting job's age, ditto
    blockpress_autoscale_decisions_total{model,direction}  scale-ups and scale-downs
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from blockpress.runtime.queue.jobqueue import JobQueue

__all__ = ["AutoscaleMetrics", "Decision", "QueueAutoscaler", "ScalePolicy", "decide"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalePolicy:
    """Bounds and thresholds of one model's replica count."""

    min_replicas: int = 1
    """Fewest replicas; kept even when the queue is empty, so a first job need not wait for a GPU."""
    max_replicas: int = 1
    """Most replicas: the GPUs this model may hold."""
    jobs_per_replica: float = 2.0
    """Waiting jobs per replica tolerated; the pool grows to keep the queue within this share."""
    max_wait_s: float = 5.0
    """Oldest wait past which the pool grows by one, however short the queue."""
    down_idle_s: float = 60.0
    """Seconds the queue must stay empty before one replica drains; each further one waits again."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas, >= 1; got {self.min_replicas}..{self.max_replicas}"
            )
        if self.jobs_per_replica <= 0 or self.max_wait_s <= 0 or self.down_idle_s < 0:
            raise ValueError("jobs_per_replica and max_wait_s must be > 0, down_idle_s >= 0")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one look at a queue concluded: the replica count wanted and why."""

    desired: int
    reason: str
    """`lag` (too many waiting), `wait` (waited too long), `idle` (queue empty long enough), `bounds`
    (outside min..max), or `steady`."""


def decide(policy: ScalePolicy, *, current: int, depth: int, oldest_age_s: float, idle_s: float) -> Decision:
    """The replica count `policy` wants for a queue that shows `depth` and `oldest_age_s`.

    Args:
        current: replicas in the pool now.
        depth: jobs waiting (not started).
        oldest_age_s: seconds the oldest waiting job has waited.
        idle_s: seconds the queue has been empty (0 while jobs wait).
    """
    bounded = min(max(current, policy.min_replicas), policy.max_replicas)
    if bounded != current:
        return Decision(bounded, "bounds")
    if depth > 0:
        by_lag = math.ceil(depth / policy.jobs_per_replica)
        if by_lag > current and current < policy.max_replicas:
            return Decision(min(by_lag, policy.max_replicas), "lag")
        if oldest_age_s > policy.max_wait_s and current < policy.max_replicas:
            return Decision(current + 1, "wait")
        return Decision(current, "steady")
    if idle_s >= policy.down_idle_s and current > policy.min_replicas:
        return Decision(current - 1, "idle")
    return Decision(current, "steady")


class ScalablePool(Protocol):
    """What the autoscaler needs of a pool (`ReplicaPool` is one)."""

    model: str

    @property
    def size(self) -> int: ...

    def scale_to(self, n: int) -> int: ...


class AutoscaleMetrics:
    """The autoscaler's gauges and counters on one registry (a fresh one per instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.replicas = Gauge("blockpress_autoscale_replicas", "Replicas in the pool", ["model"], registry=r)
        self.desired = Gauge(
            "blockpress_autoscale_desired_replicas", "Replicas the policy wants", ["model"], registry=r
        )
        self.depth = Gauge(
            "blockpress_autoscale_queue_depth", "Jobs waiting, as the autoscaler saw", ["model"], registry=r
        )
        self.oldest = Gauge(
            "blockpress_autoscale_oldest_wait_seconds", "Oldest waiting job's age", ["model"], registry=r
        )
        self.decisions = Counter(
            "blockpress_autoscale_decisions", "Pool resizes by direction", ["model", "direction"], registry=r
        )


class QueueAutoscaler:
    """Resizes each pool from its model's queue every `interval_s`.

    Args:
        queue: the job queue the replicas pull from.
        pools: one pool per model.
        policy: bounds and thresholds, the same for every model.
        interval_s: seconds between looks.
        metrics: where decisions are recorded; None: a fresh `AutoscaleMetrics`.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        queue: JobQueue,
        pools: Sequence[ScalablePool],
        policy: ScalePolicy,
        *,
        interval_s: float = 2.0,
        metrics: AutoscaleMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.pools = list(pools)
        self.policy = policy
        self.interval_s = interval_s
        self.metrics = metrics or AutoscaleMetrics()
        self._clock = clock
        # A queue counts as idle from the autoscaler's start, not from the epoch.
        self._last_busy = {pool.model: clock() for pool in self.pools}
        self.history: list[tuple[str, int, int, str]] = []
        """(model, from, to, reason) of every resize, oldest first."""

    async def step(self) -> dict[str, Decision]:
        """One look at every queue; resizes the pools that need it and returns the decisions."""
        decisions = {}
        for pool in self.pools:
            model = pool.model
            depth = await self.queue.depth(model)
            oldest = await self.queue.oldest_age(model)
            now = self._clock()
            if depth > 0:
                self._last_busy[model] = now
            current = pool.size
            decision = decide(
                self.policy, current=current, depth=depth, oldest_age_s=oldest, idle_s=now - self._last_busy[model]
            )
            m = self.metrics
            m.depth.labels(model).set(depth)
            m.oldest.labels(model).set(oldest)
            m.desired.labels(model).set(decision.desired)
            if decision.desired != current:
                direction = "up" if decision.desired > current else "down"
                log.info(
                    "autoscale %s: %d -> %d replicas (%s: %d queued, oldest waited %.1f s)",
                    model, current, decision.desired, decision.reason, depth, oldest,
                )  # fmt: skip
                await asyncio.to_thread(pool.scale_to, decision.desired)
                m.decisions.labels(model, direction).inc()
                self.history.append((model, current, decision.desired, decision.reason))
                if direction == "down":
                    self._last_busy[model] = now  # the next step down waits a full idle period again
            m.replicas.labels(model).set(pool.size)
            decisions[model] = decision
        return decisions

    async def run(self, stop: asyncio.Event) -> None:
        """Calls `step()` every `interval_s` until `stop` is set; a failed look skips one round."""
        while not stop.is_set():
            try:
                await self.step()
            except Exception:  # Redis away for a moment: keep the pools as they are and look again
                log.exception("autoscale round failed; pools unchanged")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
