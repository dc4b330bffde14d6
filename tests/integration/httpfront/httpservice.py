"""The real service for the HTTP front's tests: real Redis, a Gateway with its HTTP API on port 0, and a
replica's job runner on the real engine with the shipped tiny checkpoint (trained to call `calculator`).

A module of its own, not the conftest: `from conftest import ...` would find whichever conftest another
test folder loaded first in a whole-suite run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from blockpress.runtime.cli.embedded import server_tools
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import JobNotFound
from blockpress.runtime.gateway.cards import ModelCard
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.engine import DiffusionEngine
from blockpress.workers.runner import JobRunner

# The declaration the tiny checkpoint was trained with (workers/tinytrain/data.py).
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with integers, +, - and *.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example 37*41+12"}},
            "required": ["expression"],
        },
    },
}
QUESTION = "What is 37*41+12?"


@dataclass
class Service:
    gateway: Gateway
    queue: JobQueue
    runner: JobRunner

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}/v1"

    async def redis_has(self, job_id: str) -> bool:
        """Whether the job has been queued."""
        try:
            await self.queue.get(job_id)
        except JobNotFound:
            return False
        return True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"


@contextlib.asynccontextmanager
async def running(
    redis_client: Any,
    engine: DiffusionEngine,
    card: ModelCard,
    *,
    replica: bool = True,
    beat: bool = True,
    **settings: Any,
) -> AsyncIterator[Service]:
    """The gateway (gRPC and HTTP on free ports) and, with `replica`, one runner taking its jobs; with
    `beat`, a replica heartbeat even when none runs, so that jobs are admitted and wait."""
    gateway_settings = RuntimeSettings(port=0, http_port=0, health_interval_s=0.2, **settings)
    queue = JobQueue(redis_client, max_queue_per_model=gateway_settings.max_queue)
    gateway = Gateway(gateway_settings, queue, {card.name: card}, agent_tools=server_tools(gateway_settings))
    runner = JobRunner(engine, queue, model=card.name, replica_id="replica-1")
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, block_ms=100)) if replica else None
    if beat:
        await queue.beat(card.name, "replica-1")
    await gateway.start()
    try:
        yield Service(gateway, queue, runner)
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await gateway.stop(grace=0)
