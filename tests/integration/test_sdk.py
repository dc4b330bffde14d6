"""The SDK end to end: Client and AsyncClient -> gateway (grpc.aio) -> real Redis -> Ray replicas.

Also the service-level promises that need replicas: overload refuses with RESOURCE_EXHAUSTED and every
accepted job completes, concurrent clients all see one final state, a deadline that passes in the
queue ends EXPIRED, and a gateway killed with SIGKILL and restarted loses no accepted job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from blockpress.runtime import AsyncClient, Client, Job, JobState, ModelInfo
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import (
    InvalidArgument,
    JobCancelled,
    JobExpired,
    JobFinished,
    ModelNotFound,
    QueueFull,
    ServiceUnavailable,
)
from blockpress.runtime.gateway.cards import load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.pool import ReplicaPool

pytestmark = pytest.mark.slow

FAST = {"max_new_tokens": 32, "max_denoising_steps": 2, "seed": 1}
# Fixed steps, no stop token: a job that keeps a replica busy for a few seconds.
LONG = {"max_new_tokens": 1024, "max_denoising_steps": 400, "confidence_threshold": 0, "stop_token_ids": [511]}
QUEUE_OPTIONS = {"lease_s": 5.0, "max_deliveries": 3}


class GatewayThread:
    """The gateway in its own thread and loop, so that blocking and async clients can both call it."""

    def __init__(self, redis_url: str, model_path: str, **overrides: Any) -> None:
        self.settings = RuntimeSettings(port=0, health_interval_s=0.2, redis_url=redis_url, **overrides)
        self.card = load_model_card(model_path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway: Gateway = self.call(self._start())
        self.address = f"127.0.0.1:{self.gateway.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Gateway:
        client = aioredis.Redis.from_url(self.settings.redis_url_or_default())
        queue = JobQueue(client, max_queue_per_model=self.settings.max_queue, **QUEUE_OPTIONS)
        gateway = Gateway(self.settings, queue, {self.card.name: self.card})
        await gateway.start()
        return gateway

    def close(self) -> None:
        self.call(self.gateway.stop(grace=0))
        self.call(self.gateway.queue.redis.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def pool(ray_cluster: Any, redis_server: Any, tiny_checkpoint: Path) -> Iterator[ReplicaPool]:
    pool = ReplicaPool(
        str(tiny_checkpoint),
        1,
        redis_url=redis_server.url,
        queue_options=QUEUE_OPTIONS,
        device="cpu",
        name_prefix=f"sdk{uuid.uuid4().hex[:6]}-",
        torch_threads=1,
    )
    pool.start(timeout_s=240)
    yield pool
    pool.stop(drain_s=10)


@pytest.fixture(scope="module")
def gw(pool: ReplicaPool, redis_server: Any, tiny_checkpoint: Path) -> Iterator[GatewayThread]:
    gateway = GatewayThread(redis_server.url, str(tiny_checkpoint), max_queue=3)
    yield gateway
    gateway.close()


@pytest.fixture
def client(gw: GatewayThread) -> Iterator[Client]:
    with Client(gw.address, timeout=120) as c:
        yield c


def _wait_started(handle: Any) -> None:
    for event in handle.events():
        if event.type == "started":
            return
    raise AssertionError(f"job {handle.job_id} ended without starting")


def test_generate_stream_submit(client: Client) -> None:
    result = client.generate("2+2=", **FAST)
    assert result.job_id and result.token_ids and result.stop_reason in ("stop_token", "max_new_tokens")
    assert result.usage.prompt_tokens == 5  # <bos> and four bytes
    assert result.usage.completion_tokens == len(result.token_ids)
    assert result.timings["total_s"] > 0

    events = list(client.stream("hello", drafts=True, **FAST))
    types = [e.type for e in events]
    assert types[0] == "queued" and types[1] == "started" and types[-1] == "completed"
    assert "canvas" in types and "draft" in types
    assert types.count("completed") == 1
    assert "".join(e.data["text"] for e in events if e.type == "canvas") == events[-1].data["text"]

    handle = client.submit("again", **FAST)
    done = handle.result(timeout=120)
    assert done.job_id == handle.job_id
    assert handle.status() is JobState.SUCCEEDED
    with pytest.raises(JobFinished):
        handle.cancel()
    # The events of a finished job can be read again, from the first.
    assert [e.type for e in handle.events()][-1] == "completed"


def test_same_seed_same_text(client: Client) -> None:
    assert client.generate("seeded", **FAST).text == client.generate("seeded", **FAST).text


def test_typed_errors_keep_code_and_message(client: Client) -> None:
    with pytest.raises(InvalidArgument) as bad:
        client.generate("", **FAST)
    assert bad.value.field == "generation.prompt" and "empty" in bad.value.message
    with pytest.raises(InvalidArgument, match="t_min"):
        client.submit("hi", t_min=-1.0)
    with pytest.raises(InvalidArgument, match=r"settings\.temperature"):
        client.submit("hi", temperature=1.0)
    with pytest.raises(ModelNotFound):
        client.generate("hi", model="nope")


def test_cancel_a_running_job(client: Client) -> None:
    handle = client.submit("long one", **LONG)
    _wait_started(handle)
    assert handle.cancel() in (JobState.RUNNING, JobState.CANCELLED)
    with pytest.raises(JobCancelled):
        handle.result(timeout=60)
    assert handle.status() is JobState.CANCELLED


def test_idempotent_job_id(client: Client) -> None:
    job_id = f"idem-{uuid.uuid4().hex[:8]}"
    a = client.generate("one", job_id=job_id, **FAST)
    b = client.generate("one", job_id=job_id, **FAST)  # the same job again: its events, not a new run
    assert a.job_id == b.job_id == job_id and a.text == b.text


def test_deadline_passing_in_the_queue_expires(client: Client) -> None:
    busy = client.submit("keeps the replica busy", **LONG)
    _wait_started(busy)
    late = client.submit("waits too long", timeout=1.0, **FAST)
    time.sleep(1.5)
    busy.cancel()
    with pytest.raises(JobExpired):
        late.result(timeout=60)
    assert late.status() is JobState.EXPIRED
    with pytest.raises(JobCancelled):
        busy.result(timeout=60)


def test_overload_refuses_and_every_accepted_job_completes(client: Client) -> None:
    accepted, refused = [], []

    def submit(i: int) -> None:
        try:
            accepted.append(client.submit(f"load {i}", **FAST))
        except QueueFull as exc:
            assert exc.retry_after_s > 0
            refused.append(exc)

    busy = client.submit("busy", **LONG)
    _wait_started(busy)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(submit, range(12)))
    busy.cancel()
    assert len(accepted) == 3 and len(refused) == 9  # max_queue=3 while the only replica is busy
    for handle in accepted:
        result = handle.result(timeout=120)
        assert result.job_id == handle.job_id and result.token_ids
        assert result.usage.completion_tokens == len(result.token_ids)
        assert handle.status() is JobState.SUCCEEDED


def test_concurrent_clients_each_get_one_final_state(gw: GatewayThread) -> None:
    async def one_client(n: int) -> list[str]:
        async with AsyncClient(gw.address, timeout=180) as ac:
            finals = []
            for i in range(2):
                handle = await ac.submit(f"client {n} job {i}", **FAST)
                events = [e async for e in handle.events()]
                assert sum(e.is_final for e in events) == 1 and events[-1].is_final
                finals.append(events[-1].type)
            return finals

    async def main() -> list[list[str]]:
        # Three clients at a queue bound of 3: every submit fits, and SDK retries cover no errors here.
        return await asyncio.gather(*(one_client(n) for n in range(3)))

    finals = asyncio.run(main())
    assert [t for client_finals in finals for t in client_finals] == ["completed"] * 6


def test_async_client_end_to_end(gw: GatewayThread) -> None:
    async def main() -> None:
        async with AsyncClient(gw.address, timeout=120) as ac:
            result = await ac.generate("async", **FAST)
            assert result.token_ids
            types = [e.type async for e in ac.stream("async stream", **FAST)]
            assert types[0] == "queued" and types[-1] == "completed"
            handle = await ac.submit("async handle", **FAST)
            assert (await handle.result(timeout=120)).job_id == handle.job_id
            assert await handle.status() is JobState.SUCCEEDED
            with pytest.raises(InvalidArgument):
                await ac.submit("", **FAST)
            (model,) = await ac.models()
            assert isinstance(model, ModelInfo) and model.replicas_live == 1
            job = await ac.get_job(handle.job_id)
            assert isinstance(job, Job) and job.state is JobState.SUCCEEDED and job.kind == "generate"
            assert job.result is not None and job.result.token_ids and type(job.result.usage.prompt_tokens) is int

    asyncio.run(main())


def test_run_answers_with_the_final_event_and_generate_falls_back_to_the_stream(gw: GatewayThread) -> None:
    import grpc

    from blockpress.runtime._pb import runtime_pb2 as pb
    from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
    from blockpress.runtime.convert import generation_request

    async def main() -> None:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.RuntimeStub(channel)
            request = generation_request("run me", settings=FAST)
            final = await stub.Run(request, timeout=120)
            assert final.job_id == request.job_id and final.WhichOneof("event") == "completed"
            again = await stub.Run(request, timeout=120)  # the same job: its final event again
            assert again.id == final.id and again.completed.text == final.completed.text
            events = [e async for e in stub.Watch(pb.WatchRequest(job_id=request.job_id), timeout=120)]
            assert events[-1].id == final.id and [e.WhichOneof("event") for e in events].count("completed") == 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Run(generation_request("", settings=FAST), timeout=30)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        async with AsyncClient(gw.address, timeout=120) as ac:
            by_run = await ac.generate("same seed", **FAST)
            # A gateway without Run answers UNIMPLEMENTED (a real one, for a method it does not have):
            # the SDK then follows the event stream, with the same outcome.
            ac._stub.Run = ac._channel.unary_unary(
                "/blockpress.v1.Runtime/NoSuchMethod",
                request_serializer=pb.SubmitRequest.SerializeToString,
                response_deserializer=pb.JobEvent.FromString,
            )
            by_stream = await ac.generate("same seed", **FAST)
            assert by_stream.job_id != by_run.job_id and by_stream.text == by_run.text

    asyncio.run(main())


def test_unreachable_gateway_is_unavailable_after_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=5, retries=2) as c, pytest.raises(ServiceUnavailable):
        c.submit("hi")


def _start_gateway(redis_url: str, model: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BLOCKPRESS_MAX_QUEUE": "100"}
    cmd = [sys.executable, "-m", "blockpress.runtime.cli", "gateway", "--redis-url", redis_url]
    return subprocess.Popen([*cmd, "--model", model, "--port", str(port)], env=env)


def test_gateway_killed_and_restarted_loses_no_accepted_job(
    pool: ReplicaPool, redis_server: Any, tiny_checkpoint: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start_gateway(redis_server.url, str(tiny_checkpoint), port)
    try:
        with Client(f"127.0.0.1:{port}", timeout=120, retries=40) as c:
            handles = [c.submit(f"before the kill {i}", **FAST) for i in range(4)]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = _start_gateway(redis_server.url, str(tiny_checkpoint), port)
            # The SDK retries UNAVAILABLE while the new gateway starts; the jobs were in Redis all along.
            for handle in handles:
                assert handle.result(timeout=180).token_ids
                assert handle.status() is JobState.SUCCEEDED
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # a drained gateway exits cleanly
