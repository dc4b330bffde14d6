"""Issue 17, item 7: a replica killed mid-job is reclaimed by its restarted self at once, and the
client sees each canvas once although the re-run attempt writes canvas 0 again.

Real parts: a Ray replica on the tiny checkpoint, kill -9 of its process (Ray restarts the actor
under the same consumer name), a real gateway on port 0, the SDK and the CLI's printer.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from blockpress.runtime.cli.output import print_events
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.jobs import Event
from blockpress.runtime.gateway.cards import ModelCard
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.runtime.sdk.aio import AsyncClient
from blockpress.workers.pool import ReplicaPool

pytestmark = pytest.mark.slow

LEASE_S = 60.0
# No seed: the gateway chooses one. An empty stop list does not travel over gRPC (it reads as unset),
# so the one stop token lies past the tiny vocabulary: the job runs its three canvases.
LONG = {"max_new_tokens": 96, "max_denoising_steps": 40, "confidence_threshold": 0, "stop_token_ids": [10**6]}


@pytest.fixture
def pool(ray_cluster: Any, tiny_checkpoint: Path, redis_server: Any) -> Iterator[ReplicaPool]:
    replicas = ReplicaPool(
        str(tiny_checkpoint),
        1,
        redis_url=redis_server.url,
        queue_options={"lease_s": LEASE_S, "max_deliveries": 3},
        device="cpu",
        name_prefix=f"r{uuid.uuid4().hex[:6]}-",
        torch_threads=1,
    )
    replicas.start(timeout_s=240)
    yield replicas
    replicas.stop(drain_s=5)


async def test_a_killed_replica_reclaims_its_job_at_once_and_the_client_sees_each_canvas_once(
    pool: ReplicaPool, redis_server: Any, gateway_card: ModelCard
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    queue = JobQueue(client, lease_s=LEASE_S)
    gateway = Gateway(RuntimeSettings(port=0), queue, {gateway_card.name: gateway_card})
    await gateway.start()
    seen: list[Event] = []
    try:
        async with AsyncClient(f"127.0.0.1:{gateway.port}") as sdk:
            job_id = f"rerun-{uuid.uuid4().hex[:8]}"

            async def take() -> None:
                async for event in sdk.stream("a long story", job_id=job_id, model=pool.model, timeout=240, **LONG):
                    seen.append(event)

            taking = asyncio.create_task(take())
            give_up = time.monotonic() + 180
            while not any(e.type == "canvas" for e in seen):  # mid-job: a canvas of three is out
                assert time.monotonic() < give_up and not taking.done(), [e.type for e in seen]
                await asyncio.sleep(0.02)
            os.kill(pool.infos()[0]["pid"], signal.SIGKILL)
            killed = time.monotonic()
            while not [e for e in seen if e.type == "started" and e.data["attempt"] == 2]:
                assert time.monotonic() < give_up and not taking.done(), [e.type for e in seen]
                await asyncio.sleep(0.02)
            reclaimed = time.monotonic() - killed
            await asyncio.wait_for(taking, 180)
        raw = await queue.read_events(job_id)
    finally:
        await gateway.stop(grace=0)
        await client.aclose()
    # The lease is 60 s: a job that waited for it would be taken over only a minute after the kill.
    print(f"\nreplica killed mid-job: attempt 2 started {reclaimed:.2f} s after the kill (lease {LEASE_S:.0f} s)")
    assert reclaimed < LEASE_S / 2
    assert [e.data["attempt"] for e in raw if e.type == "started"] == [1, 2]
    raw_canvases = [(e.data["index"], e.data["text"]) for e in raw if e.type == "canvas"]
    first, *_ = [t for i, t in raw_canvases if i == 0]
    assert [t for i, t in raw_canvases if i == 0] == [first, first], "the re-run wrote canvas 0 again, the same"
    assert seen[-1].type == "completed"
    shown = [e for e in seen if e.type == "canvas"]
    assert [e.data["index"] for e in shown] == list(range(seen[-1].data["canvases"])), raw_canvases
    out = io.StringIO()
    print_events(iter(seen), drafts=False, out=out, err=io.StringIO())
    assert out.getvalue() == "".join(e.data["text"] for e in shown) + "\n"
    assert [e.data["attempt"] for e in seen if e.type == "started"] == [1, 2], "the client is told of the re-run"
