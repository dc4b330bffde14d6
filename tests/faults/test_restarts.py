"""Issue 17, item 7: the SDK rides out restarts, and a gateway believes only fresh heartbeats.

Real parts: a redis-server of the test's own that is killed and restarted, a gateway started as
`python -m blockpress.runtime.cli gateway` and killed with SIGKILL, the SDK's `AsyncClient` with its
default `retry_s`. The replica is played through the queue (`run_jobs`), so each job ends exactly
when the test says.

- Redis down for 10 s: every Generate stream and Watch opened before the kill finishes afterwards;
- the gateway killed and a new one started on the same port: every open SDK call finishes;
- a fresh gateway that finds only heartbeats older than the live window is NOT_SERVING and refuses
  submits with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import ServiceUnavailable
from blockpress.runtime.contracts.jobs import Event, JobState
from blockpress.runtime.gateway.cards import ModelCard
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import LIVE_WINDOW_S, TRANSIENT_ERRORS, JobQueue
from blockpress.runtime.sdk.aio import AsyncClient

pytestmark = pytest.mark.slow

CALLS = 6  # half Generate streams, half Submit + Watch


class Calls:
    """Open SDK calls, each with the monotonic time of every event it got."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.tasks: list[asyncio.Task[list[Event]]] = []

    async def _take(self, job_id: str, events: AsyncIterator[Event]) -> list[Event]:
        got: list[Event] = []
        async for event in events:
            got.append(event)
            self.times[job_id].append(time.monotonic())
        return got

    def open(self, client: AsyncClient, job_id: str, *, stream: bool) -> None:
        self.times[job_id] = []
        if stream:
            events = client.stream("hello", job_id=job_id, timeout=180)
        else:
            events = self._submitted_then_watched(client, job_id)
        self.tasks.append(asyncio.create_task(self._take(job_id, events)))

    async def _submitted_then_watched(self, client: AsyncClient, job_id: str) -> AsyncIterator[Event]:
        handle = await client.submit("hello", job_id=job_id, timeout=180)
        async for event in handle.events(timeout=180):
            yield event

    async def until_each_saw_one(self, timeout_s: float = 60) -> None:
        give_up = time.monotonic() + timeout_s
        while not all(self.times.values()):
            assert time.monotonic() < give_up, {k: len(v) for k, v in self.times.items()}
            assert not any(t.done() for t in self.tasks), [t.exception() for t in self.tasks if t.done()]
            await asyncio.sleep(0.05)

    def longest_gap(self) -> float:
        return max(b - a for times in self.times.values() for a, b in itertools.pairwise(times))


async def run_jobs(queue: JobQueue, model: str, count: int, *, timeout_s: float = 60) -> None:
    """Plays a replica: claims and completes `count` jobs, riding out a Redis that is still coming back."""
    done, give_up = 0, time.monotonic() + timeout_s
    while done < count:
        assert time.monotonic() < give_up, f"only {done} of {count} jobs ran"
        try:
            await queue.beat(model, "test-replica")
            claim = await queue.claim(model, "test-replica", block_ms=500)
            if claim is None:
                continue
            await queue.append_event(claim, "canvas", {"index": 0, "text": "c0", "steps": 1, "tokens": 1})
            result = {"text": "c0", "token_ids": [1], "stop_reason": "stop_token", "canvases": 1}
            assert await queue.finish(claim, JobState.SUCCEEDED, result=result)
            done += 1
        except TRANSIENT_ERRORS:
            await asyncio.sleep(0.1)


async def beat_forever(queue: JobQueue, model: str) -> None:
    while True:
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await queue.beat(model, "test-replica")
        await asyncio.sleep(0.5)


def assert_all_completed(results: list[list[Event]]) -> None:
    for events in results:
        kinds = [e.type for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "completed" and kinds.count("completed") == 1, kinds


async def test_open_calls_finish_across_a_10_s_redis_restart(private_redis: Any, gateway_card: ModelCard) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    queue = JobQueue(client, lease_s=30.0)
    gateway = Gateway(RuntimeSettings(port=0, health_interval_s=0.1), queue, {gateway_card.name: gateway_card})
    beating = asyncio.create_task(beat_forever(queue, gateway_card.name))
    await queue.beat(gateway_card.name, "test-replica")
    await gateway.start()
    calls = Calls()
    try:
        async with AsyncClient(f"127.0.0.1:{gateway.port}") as sdk:
            for i in range(CALLS):
                calls.open(sdk, f"redis-restart-{i}", stream=i % 2 == 0)
            await calls.until_each_saw_one()
            private_redis.kill(signal.SIGKILL)
            await asyncio.sleep(10.0)
            private_redis.start()
            back = time.monotonic()
            await run_jobs(queue, gateway_card.name, CALLS)
            results = await asyncio.wait_for(asyncio.gather(*calls.tasks), 90)
        assert_all_completed(results)
        after = max(times[-1] for times in calls.times.values()) - back
        print(
            f"\nRedis down 10 s: all {CALLS} open calls finished; longest wait of a call between two events "
            f"{calls.longest_gap():.2f} s; last call done {after:.2f} s after Redis was back"
        )
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await gateway.stop(grace=0)
        await client.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_gateway(checkpoint: Path, redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable, "-m", "blockpress.runtime.cli", "gateway", "--model", str(checkpoint),
        "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port), "--http-port", "off",
    ]  # fmt: skip
    env = {**os.environ, "BLOCKPRESS_HEALTH_INTERVAL_S": "0.2"}
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


async def _until_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    give_up = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < give_up, log.read_text()[-2000:]
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)


async def test_open_calls_finish_across_a_gateway_kill_and_restart(
    redis_server: Any, redis_client: Any, gateway_card: ModelCard, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    queue = JobQueue(redis_client, lease_s=30.0)
    beating = asyncio.create_task(beat_forever(queue, gateway_card.name))
    port, log = _free_port(), tmp_path / "gateway.log"
    address = f"127.0.0.1:{port}"
    procs = [_start_gateway(tiny_checkpoint, redis_server.url, port, log)]
    calls = Calls()
    try:
        await _until_serving(address, procs[0], log)
        async with AsyncClient(address) as sdk:
            for i in range(CALLS):
                calls.open(sdk, f"gateway-restart-{i}", stream=i % 2 == 0)
            await calls.until_each_saw_one()
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(timeout=20)
            killed = time.monotonic()
            await asyncio.sleep(1.0)  # the calls see the gateway gone and start retrying
            procs.append(_start_gateway(tiny_checkpoint, redis_server.url, port, log))
            await _until_serving(address, procs[1], log)
            serving = time.monotonic() - killed
            await run_jobs(queue, gateway_card.name, CALLS)
            results = await asyncio.wait_for(asyncio.gather(*calls.tasks), 90)
        assert_all_completed(results)
        print(
            f"\ngateway kill -9, new one SERVING {serving:.2f} s later: all {CALLS} open calls finished; "
            f"longest wait of a call between two events {calls.longest_gap():.2f} s"
        )
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=20)


async def test_a_fresh_gateway_with_only_stale_heartbeats_serves_nothing(
    redis_client: Any, gateway_card: ModelCard
) -> None:
    queue = JobQueue(redis_client)
    # Heartbeats of replicas that died before the gateway started: just past the live window.
    stale = time.time() - LIVE_WINDOW_S - 1.0
    await redis_client.hset(queue.keys.replicas(gateway_card.name), mapping={"gone-1": stale, "gone-2": stale - 20})
    gateway = Gateway(RuntimeSettings(port=0, health_interval_s=0.1), queue, {gateway_card.name: gateway_card})
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "blockpress.v1.Runtime"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        async with AsyncClient(f"127.0.0.1:{gateway.port}", retries=0) as sdk:
            with pytest.raises(ServiceUnavailable, match="no replica"):
                await sdk.submit("hello", timeout=5)
            [model] = await sdk.models()
            assert model.replicas_live == 0
        assert await queue.depth(gateway_card.name) == 0, "nothing was queued"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub_request = pb.SubmitRequest(generation=pb.GenerationTask(prompt="hi"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(
                    "/blockpress.v1.Runtime/Submit",
                    request_serializer=pb.SubmitRequest.SerializeToString,
                    response_deserializer=pb.SubmitResponse.FromString,
                )(stub_request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.stop(grace=0)
