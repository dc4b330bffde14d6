"""The gateway's Prometheus endpoint: served only when `gateway_metrics_port` is set, with the queue
gauges a sampler refreshes from the real Redis."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_the_gateway_serves_metrics_when_a_port_is_set(redis_client: Any, tiny_checkpoint: Path) -> None:
    card = await asyncio.to_thread(load_model_card, str(tiny_checkpoint))
    queue = JobQueue(redis_client)
    await queue.submit(JobSpec(job_id="metrics-1", model=card.name, prompt="2+2="))
    gateway = Gateway(RuntimeSettings(port=0, gateway_metrics_port=0), queue, {card.name: card})
    await gateway.start()
    try:
        assert gateway.metrics_port
        line = f'blockpress_queue_depth{{model="{card.name}"}} 1.0'
        for _ in range(50):  # the sampler's first round runs as the gateway starts
            text = await asyncio.to_thread(_scrape, gateway.metrics_port)
            if line in text:
                break
            await asyncio.sleep(0.1)
        assert line in text
    finally:
        await gateway.stop(grace=0)
    assert gateway._sampler is not None and gateway._sampler.done()


async def test_no_metrics_are_served_without_a_port(redis_client: Any, tiny_checkpoint: Path) -> None:
    card = await asyncio.to_thread(load_model_card, str(tiny_checkpoint))
    async with Gateway(RuntimeSettings(port=0), JobQueue(redis_client), {card.name: card}) as gateway:
        assert gateway.metrics_port is None
