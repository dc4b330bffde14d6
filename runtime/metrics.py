"""Prometheus metrics of the gateway and the replicas: what autoscaling and dashboards read.

The gateway samples its queues (`sample_queues`, a task beside its health loop); a replica records each
job it finishes (`job_finished`, `observe_generation`). Each process serves its own registry with
`start_metrics_server`; Prometheus sums counters and histograms across instances.

    blockpress_queue_depth{model}                  jobs waiting (QUEUED)
    blockpress_queue_oldest_age_seconds{model}     how long the oldest of them has waited
    blockpress_replicas_live{model}                replicas with a fresh heartbeat
    blockpress_jobs_total{model,state}             jobs by final state
    blockpress_tokens_per_second{model}            per job: new tokens over generation time
    blockpress_steps_per_canvas{model}             per canvas: denoising steps taken
    blockpress_time_to_first_canvas_seconds{model} per job: queue wait plus time to the first canvas
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from blockpress.runtime.queue.jobqueue import JobQueue
    from blockpress.workers.types import GenerationResult

__all__ = ["RuntimeMetrics", "get_metrics", "sample_queues", "start_metrics_server"]

log = logging.getLogger(__name__)

_STEP_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
_TPS_BUCKETS = (10, 25, 50, 100, 200, 350, 500, 700, 1000, 1500, 2000, 4000)
_TTFC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RuntimeMetrics:
    """The BlockPress metrics on one registry (a fresh one per instance, so tests stay independent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.queue_depth = Gauge("blockpress_queue_depth", "Jobs waiting", ["model"], registry=r)
        self.queue_oldest_age = Gauge(
            "blockpress_queue_oldest_age_seconds", "Wait of the oldest queued job", ["model"], registry=r
        )
        self.replicas_live = Gauge("blockpress_replicas_live", "Replicas with a fresh heartbeat", ["model"], registry=r)
        self.jobs = Counter("blockpress_jobs", "Jobs by final state", ["model", "state"], registry=r)
        self.tokens_per_second = Histogram(
            "blockpress_tokens_per_second", "New tokens per second of generation", ["model"],
            buckets=_TPS_BUCKETS, registry=r,
        )  # fmt: skip
        self.steps_per_canvas = Histogram(
            "blockpress_steps_per_canvas",
            "Denoising steps per canvas",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.time_to_first_canvas = Histogram(
            "blockpress_time_to_first_canvas_seconds", "Queue wait plus time to the first committed canvas",
            ["model"], buckets=_TTFC_BUCKETS, registry=r,
        )  # fmt: skip

    def observe_queue(self, model: str, *, depth: int, oldest_age_s: float, replicas_live: int) -> None:
        self.queue_depth.labels(model).set(depth)
        self.queue_oldest_age.labels(model).set(oldest_age_s)
        self.replicas_live.labels(model).set(replicas_live)

    def job_finished(self, model: str, state: str) -> None:
        """Count a job that reached a final state (SUCCEEDED, FAILED, CANCELLED, ...)."""
        self.jobs.labels(model, state).inc()

    def observe_generation(self, model: str, result: GenerationResult, *, queued_s: float = 0.0) -> None:
        """Record one finished generation; `queued_s` is its wait in the queue before it started."""
        for canvas in result.canvases:
            self.steps_per_canvas.labels(model).observe(canvas.steps)
        if result.canvases:
            self.time_to_first_canvas.labels(model).observe(queued_s + result.timings.first_canvas_s)
        if result.timings.total_s > 0:
            self.tokens_per_second.labels(model).observe(len(result.token_ids) / result.timings.total_s)


_default: RuntimeMetrics | None = None


def get_metrics() -> RuntimeMetrics:
    """The process-wide metrics, created on first use."""
    global _default
    if _default is None:
        _default = RuntimeMetrics()
    return _default


def start_metrics_server(port: int, *, host: str = "127.0.0.1", metrics: RuntimeMetrics | None = None) -> Any:
    """Serve `/metrics` for `metrics` (the process-wide ones by default) on a daemon thread.

    Port 0 picks a free port, which is what several replicas on one machine want. `host` defaults to
    loopback: a scraper elsewhere needs the operator to say so (`RuntimeSettings.host`). Returns the
    HTTP server: `.server_port` is the port it bound; `.shutdown()` then `.server_close()` stop it.
    """
    metrics = metrics or get_metrics()
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


async def sample_queues(
    queue: JobQueue,
    models: Iterable[str],
    *,
    stop: asyncio.Event,
    metrics: RuntimeMetrics | None = None,
    interval_s: float = 5.0,
) -> None:
    """Refreshes the queue gauges every `interval_s` until `stop` is set; a Redis error skips one round.

    Ended by an event rather than a cancel: a cancel that lands inside a Redis call can leave the
    queue's shared connection in the middle of a reply.
    """
    metrics = metrics or get_metrics()
    names = list(models)
    while not stop.is_set():
        for model in names:
            try:
                depth, age, live = await asyncio.gather(
                    queue.depth(model), queue.oldest_age(model), queue.live_replicas(model)
                )
            except Exception as exc:  # the gauges keep their last values; health reports the outage
                log.debug("metrics: sampling %s failed: %s", model, exc)
                continue
            metrics.observe_queue(model, depth=depth, oldest_age_s=age, replicas_live=live)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
