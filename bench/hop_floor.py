"""The floor under the service's added latency: a job's hops between processes, with no work done in them.

    python bench/hop_floor.py [--jobs 150] [--engine-ms 20] [--submits 3000] [--concurrency 64]

A stand-in for each process of the real path, doing only its messaging: the client calls a unary
gRPC method on a grpc.aio "gateway" process, which runs a submit script in Redis and waits on the
job's event stream; a "replica" process reads the job from the consumer group, runs a start script,
hands the job to its job thread, which sleeps `--engine-ms` (an engine that holds no GIL), and runs a
finish script that appends the final event, which wakes the gateway, which answers the client. The
client calls as the SDK's blocking `Client` does (from a loop of its own in a thread), and jobs are
paced as in `bench/service_overhead.py` (the bare engine runs between them). Added latency = round trip - engine
time: what the architecture costs on this machine before any of BlockPress's code runs.

It also prints the admission ceiling of one call per job: Submit calls per second from the SDK's
`AsyncClient` (as `bench/service_overhead.py` sends them) to the stand-in gateway, which answers them
without doing anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from blockpress.runtime import AsyncClient
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.contracts.errors import BlockPressError

# The real scripts' shape in a few commands: a record, the queued/started/final events, the stream entry.
SUBMIT = """redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'state', 'QUEUED')
redis.call('XADD', KEYS[2], '*', 'type', 'queued')
return redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])"""
START = """redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_at', ARGV[1])
redis.call('XADD', KEYS[2], '*', 'type', 'started')
return redis.call('HGET', KEYS[1], 'spec')"""
FINISH = """redis.call('HSET', KEYS[1], 'state', 'SUCCEEDED')
redis.call('XACK', KEYS[3], 'g', ARGV[2])
return redis.call('XADD', KEYS[2], '*', 'type', 'completed', 'data', ARGV[1])"""


async def gateway(url: str, port: int) -> None:
    scripts, reader = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    submit = scripts.register_script(SUBMIT)

    class Servicer(pb_grpc.RuntimeServicer):
        async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
            return pb.SubmitResponse(job_id=request.job_id, state=pb.JOB_STATE_QUEUED, created=True)  # no work

        async def Run(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.JobEvent:
            job = request.job_id
            await submit(keys=[f"j:{job}", f"e:{job}", "q"], args=[request.SerializeToString(), job])
            after: bytes | str = "0"
            while True:
                for _, entries in await reader.xread({f"e:{job}": after}, block=5000):
                    for entry_id, fields in entries:
                        after = entry_id
                        if fields[b"type"] == b"completed":
                            return pb.JobEvent(id=entry_id.decode(), job_id=job)

    server = grpc.aio.server()
    pb_grpc.add_RuntimeServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def replica(url: str, engine_s: float) -> None:
    client = aioredis.Redis.from_url(url)
    await client.xgroup_create("q", "g", "0", mkstream=True)
    start, finish = client.register_script(START), client.register_script(FINISH)
    loop = asyncio.get_running_loop()
    jobs: queue.Queue[asyncio.Future[None]] = queue.Queue()

    def job_thread() -> None:
        while True:
            done = jobs.get()
            time.sleep(engine_s)
            loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=job_thread, daemon=True).start()
    while True:
        for _, entries in await client.xreadgroup("g", "r1", {"q": ">"}, count=1, block=1000) or ():
            for entry_id, fields in entries:
                job = fields[b"job"].decode()
                await start(keys=[f"j:{job}", f"e:{job}"], args=[repr(time.time())])
                done = loop.create_future()
                jobs.put(done)
                await done
                await finish(keys=[f"j:{job}", f"e:{job}", "q"], args=['{"text": ""}', entry_id])


def pct(values: list[float], q: float) -> float:
    """The `q`th percentile of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def stand_ins(engine_s: float) -> Iterator[str]:
    """Redis, the stand-in gateway and the stand-in replica, running; yields the gateway's address."""
    with tempfile.TemporaryDirectory(prefix="bp-floor-") as tmp:
        redis_port, port = free_port(), free_port()
        cmd = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "yes", "--dir", tmp]
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL)]
        url = f"redis://127.0.0.1:{redis_port}/0"
        try:
            time.sleep(0.5)
            me = [sys.executable, str(Path(__file__).resolve())]
            roles = (["gateway", "--port", str(port)], ["replica", "--engine-ms", str(engine_s * 1e3)])
            procs += [subprocess.Popen([*me, "--url", url, "--role", *role]) for role in roles]
            yield f"127.0.0.1:{port}"
        finally:
            for proc in reversed(procs):  # Redis last, so that nothing logs its going away
                proc.terminate()
                proc.wait(10)


async def _stub(address: str) -> pb_grpc.RuntimeStub:
    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), 30)
    return pb_grpc.RuntimeStub(channel)


def floor(jobs: int, engine_s: float, *, gap_s: float = 0.02) -> list[float]:
    """Added seconds per job (round trip - engine time) over the stand-in processes."""
    with stand_ins(engine_s) as address:
        # The blocking Client's pattern: its own loop in a thread, each call handed to it and waited for.
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        stub = asyncio.run_coroutine_threadsafe(_stub(address), loop).result()

        async def run(request: pb.SubmitRequest) -> None:
            await stub.Run(request, timeout=10)

        added = []
        for i in range(jobs + 10):
            request = pb.SubmitRequest(job_id=f"floor-{i}")
            t0 = time.perf_counter()
            asyncio.run_coroutine_threadsafe(run(request), loop).result()
            if i >= 10:  # warm-up: connections, scripts, lazy imports
                added.append(time.perf_counter() - t0 - engine_s)
            time.sleep(gap_s)
        loop.call_soon_threadsafe(loop.stop)
        return added


async def submit_burst(client: AsyncClient, submits: int, concurrency: int) -> list[BlockPressError]:
    """`submits` one-job Submit calls from `client`, `concurrency` in flight; the errors they met."""
    errors: list[BlockPressError] = []
    left = iter(range(submits))

    async def worker() -> None:
        for i in left:
            try:
                await client.submit(f"submit {i}", timeout=3.0, max_new_tokens=1)
            except BlockPressError as err:
                errors.append(err)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def admission_ceiling(submits: int, concurrency: int) -> float:
    """Submit calls per second, `concurrency` in flight from the SDK's `AsyncClient`, against the
    stand-in gateway's Submit, which answers at once: one call per job costs this much here already."""

    async def burst(address: str) -> float:
        async with AsyncClient(address, retries=30) as client:
            await client.submit("warm up")
            t0 = time.perf_counter()
            if errors := await submit_burst(client, submits, concurrency):
                raise errors[0]
            return submits / (time.perf_counter() - t0)

    with stand_ins(0.0) as address:
        return asyncio.run(burst(address))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=150)
    p.add_argument("--engine-ms", type=float, default=20.0)
    p.add_argument("--submits", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--role", choices=["gateway", "replica"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role is not None:
        asyncio.run(gateway(args.url, args.port) if args.role == "gateway" else replica(args.url, args.engine_ms / 1e3))
        return 0
    added = floor(args.jobs, args.engine_ms / 1e3)
    p50, p99 = pct(added, 50), pct(added, 99)
    print(f"hop floor: p50 {p50 * 1e3:.2f} ms  p99 {p99 * 1e3:.2f} ms added per job over {args.jobs} jobs")
    rate = admission_ceiling(args.submits, args.concurrency)
    print(f"admission ceiling: {rate:,.0f} Submit calls/s with {args.concurrency} in flight, answered without work")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
