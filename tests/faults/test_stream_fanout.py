"""Issue 17, item 3: open streams are not bounded by a Redis connection pool, and one client cannot
take them all. Real gateway on port 0 (its Redis pool: redis-py's default 100), real redis-server.

- 1,000 concurrent Watch streams (ten times the pool) all stay open, health stays SERVING and a Submit
  is answered while they are open, and every stream gets its job's final event;
- past `max_streams_per_client` a client's next stream gets RESOURCE_EXHAUSTED, while another client
  still opens one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blockpress.runtime._pb import runtime_pb2 as pb

LiveGateway = Any  # tests/faults/conftest.py: `live_gateway`

STREAMS = 1_000
JOBS = 250


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"max_streams_per_client": 3}


async def _watch(stub: Any, job_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    return [e async for e in stub.Watch(pb.WatchRequest(job_id=job_id), timeout=120, metadata=metadata)]


@pytest.mark.parametrize("gateway_settings", [{"max_streams_per_client": STREAMS}])
async def test_a_thousand_streams_all_finish_and_health_is_not_starved(live_gateway: LiveGateway) -> None:
    gw = live_gateway
    for i in range(JOBS):
        await gw.queue_job(f"s{i}")
    watchers = [asyncio.create_task(_watch(gw.stub, f"s{i % JOBS}")) for i in range(STREAMS)]
    deadline = time.monotonic() + 60
    while gw.gateway.fanout.open_streams < STREAMS:
        assert time.monotonic() < deadline, f"only {gw.gateway.fanout.open_streams} streams opened"
        assert not any(w.done() for w in watchers), [w.exception() for w in watchers if w.done()][:1]
        await asyncio.sleep(0.1)
    # With every stream open, the pool still serves health and submits.
    health = health_pb2_grpc.HealthStub(gw.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await asyncio.sleep(0.5)  # several health rounds of the gateway itself
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    submitted = await gw.stub.Submit(pb.SubmitRequest(generation=pb.GenerationTask(prompt="hi")), timeout=5)
    assert submitted.created
    assert gw.gateway.fanout.open_streams == STREAMS
    start = time.monotonic()
    for _ in range(JOBS + 1):
        await gw.run_to_end(canvases=1)
    results = await asyncio.wait_for(asyncio.gather(*watchers), 60)
    elapsed = time.monotonic() - start
    for events in results:
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "completed" and "canvas" in kinds, kinds
    print(f"\n{STREAMS} concurrent Watch streams over {JOBS} jobs: all finished {elapsed:.2f} s after the jobs ran")
    assert gw.gateway.fanout.open_streams == 0


async def test_one_client_cannot_take_every_stream(live_gateway: LiveGateway) -> None:
    gw = live_gateway
    await gw.queue_job("cap")
    greedy = (("authorization", "Bearer greedy"),)
    held = [asyncio.create_task(_watch(gw.stub, "cap", greedy)) for _ in range(3)]
    while gw.gateway.fanout.open_streams < 3:
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _watch(gw.stub, "cap", greedy)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams_per_client" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Generate(pb.SubmitRequest(generation=pb.GenerationTask(prompt="hi")), metadata=greedy).read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = asyncio.create_task(_watch(gw.stub, "cap", (("authorization", "Bearer other"),)))
    while gw.gateway.fanout.open_streams < 4:
        await asyncio.sleep(0.02)
    await gw.run_to_end()
    for events in await asyncio.gather(*held, other):
        assert events[-1].WhichOneof("event") == "completed"
    # Streams that ended free their places.
    assert len(await _watch(gw.stub, "cap", greedy)) >= 2
