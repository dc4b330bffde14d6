"""A gateway on a real grpc.aio server (port 0) over the session's redis-server, in the test's loop.

`LiveGateway` also plays a replica through the queue itself (heartbeats, claims, final writes), so
tests drive jobs to their end without a model running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.gateway.cards import ModelCard, load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue


class LiveGateway:
    """A started `Gateway`, a channel to it, and the queue behind it."""

    def __init__(self, gateway: Gateway, channel: grpc.aio.Channel) -> None:
        self.gateway = gateway
        self.queue = gateway.queue
        self.model = gateway.default_model
        self.channel = channel
        self.stub = pb_grpc.RuntimeStub(channel)
        self.address = f"127.0.0.1:{gateway.port}"

    async def beat(self) -> None:
        await self.queue.beat(self.model, "test-replica")

    async def queue_job(self, job_id: str, prompt: str = "hello") -> None:
        await self.queue.submit(JobSpec(job_id=job_id, model=self.model, kind="generate", prompt=prompt))

    async def run_to_end(self, *, consumer: str = "test-replica", canvases: int = 1) -> str:
        """Claims the next job, writes `canvases` canvas events and finishes it; returns its id."""
        claim = await self.queue.claim(self.model, consumer, block_ms=2000)
        assert claim is not None
        for i in range(canvases):
            await self.queue.append_event(claim, "canvas", {"index": i, "text": f"c{i}", "steps": 1, "tokens": 1})
        result = {"text": "done", "token_ids": [1], "stop_reason": "stop_token", "canvases": canvases}
        assert await self.queue.finish(claim, JobState.SUCCEEDED, result=result)
        return claim.job_id


@pytest.fixture(scope="session")
def gateway_card(tiny_checkpoint: Path) -> ModelCard:
    return load_model_card(str(tiny_checkpoint))


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    """Overrides of `RuntimeSettings` for the `live_gateway` of a test (override the fixture)."""
    return {}


@pytest.fixture
async def live_gateway(
    redis_server: Any, gateway_card: ModelCard, gateway_settings: dict[str, Any]
) -> AsyncIterator[LiveGateway]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    settings = RuntimeSettings(port=0, health_interval_s=0.1, **{"max_queue": 4096, **gateway_settings})
    queue = JobQueue(client, max_queue_per_model=settings.max_queue, lease_s=5.0)
    gateway = Gateway(settings, queue, {gateway_card.name: gateway_card})
    await queue.beat(gateway_card.name, "test-replica")

    async def beat() -> None:  # as a live replica does, inside the gateway's liveness window
        while True:
            await asyncio.sleep(0.5)
            await queue.beat(gateway_card.name, "test-replica")

    beating = asyncio.create_task(beat())
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    yield LiveGateway(gateway, channel)
    beating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beating
    await channel.close()
    await gateway.stop(grace=0)
    await client.aclose()
