"""The Prometheus endpoint: queue gauges sampled from a real Redis queue, job figures, scraped over HTTP."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.runtime.metrics import RuntimeMetrics, sample_queues, start_metrics_server
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.types import CanvasStats, GenerationResult, Timings


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """The session's redis-server (tests/conftest.py); each test empties it before use."""
    return str(redis_server.url)


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[JobQueue]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    yield JobQueue(client, lease_s=30)
    await client.aclose()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


async def test_queue_gauges_follow_the_queue(queue: JobQueue):
    metrics = RuntimeMetrics()
    now = time.time()
    for i in range(3):
        await queue.submit(JobSpec(job_id=f"j{i}", model="tiny", prompt="hi", submitted_at=now - 10 * (i + 1)))
    await queue.beat("tiny", "replica-1")
    await queue.beat("tiny", "replica-2")
    stop = asyncio.Event()
    task = asyncio.create_task(sample_queues(queue, ["tiny", "other"], stop=stop, metrics=metrics, interval_s=0.05))
    try:
        for _ in range(200):
            if metrics.queue_depth.labels("tiny")._value.get() == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task  # ends on the event, within one interval
    server = start_metrics_server(0, host="127.0.0.1", metrics=metrics)
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    model = (("model", "tiny"),)
    assert got[("blockpress_queue_depth", model)] == 3
    assert got[("blockpress_queue_depth", (("model", "other"),))] == 0
    assert 29 <= got[("blockpress_queue_oldest_age_seconds", model)] < 40, "the oldest job waited since now-30s"
    assert got[("blockpress_replicas_live", model)] == 2


def test_job_figures_are_exposed_as_counters_and_histograms():
    metrics = RuntimeMetrics()
    canvases = [CanvasStats(0, 6, 8, 32, 0.1), CanvasStats(1, 3, 8, 10, 0.1)]
    result = GenerationResult([1] * 42, "x", "stop_token", 5, 5, canvases, Timings(first_canvas_s=0.2, total_s=0.5), 0)
    metrics.observe_generation("tiny", result, queued_s=0.3)
    metrics.job_finished("tiny", "SUCCEEDED")
    metrics.job_finished("tiny", "SUCCEEDED")
    metrics.job_finished("tiny", "FAILED")
    server = start_metrics_server(0, host="127.0.0.1", metrics=metrics)
    try:
        got = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    model = (("model", "tiny"),)
    assert got[("blockpress_jobs_total", (("model", "tiny"), ("state", "SUCCEEDED")))] == 2
    assert got[("blockpress_jobs_total", (("model", "tiny"), ("state", "FAILED")))] == 1
    assert got[("blockpress_steps_per_canvas_count", model)] == 2
    assert got[("blockpress_steps_per_canvas_sum", model)] == 9
    assert got[("blockpress_steps_per_canvas_bucket", (("le", "4.0"), ("model", "tiny")))] == 1
    assert got[("blockpress_tokens_per_second_sum", model)] == pytest.approx(84.0)
    assert got[("blockpress_time_to_first_canvas_seconds_sum", model)] == pytest.approx(0.5)
