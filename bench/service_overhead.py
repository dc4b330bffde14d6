"""What the service adds to a generation, and how fast the gateway accepts jobs.

    python bench/service_overhead.py [--jobs 60] [--submits 3000] [--concurrency 64] [--checkpoint DIR]

One run, one small checkpoint (a random-weight tiny DiffusionGemma unless --checkpoint is given):

1. Latency. The same jobs (same prompt, settings and seed, so the same denoising work) run through
   the bare engine in this process and through the full service (SDK -> gateway in its own process
   -> Redis -> Ray replica -> events back), interleaved so that machine noise hits both alike. Added
   latency per job = service wall time - bare engine wall time of the same job; its p99 carries the
   engine's own run-to-run jitter twice (here the bare engine alone spreads ~15 ms between p50 and
   p99). Two more figures remove it: service wall time less the engine time the replica itself
   measured for that job, and the service's percentiles less the bare engine's.
2. Admission. `--submits` Submit calls from one asyncio client with `--concurrency` in flight, then
   as many jobs through `AsyncClient.submit_many` (SubmitMany calls of 100 jobs, 4 in flight); prints
   the accepted submits per second of each, twice. First with the replica process stopped (SIGSTOP)
   for the burst: on a cluster the replicas run on their own GPU nodes, while here they would take
   the same two cores as the gateway, so this is the gateway's own admission rate, on cores shared
   only with the client and Redis. Then with the replica running beside it, claiming and running the
   burst's jobs on the same cores, for comparison. The jobs carry a short deadline, so whatever the
   replica has not run by then ends EXPIRED.

Targets on the 2-core development machine: added p50 <= 5 ms, p99 <= 10 ms; >= 2,000 submits/s.
The latency part also prints where the added time goes, hop by hop, from the job record's clocks, and
the floor under it: the same process hops with no work in them (`bench/hop_floor.py`); the admission
part ends with the ceiling of one call per job: Submit calls to a server that answers without work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hop_floor  # bench/, beside this script
from hop_floor import free_port, pct

from blockpress.runtime import AsyncClient, Client
from blockpress.runtime.cli.embedded import OwnedRedis, start_ray
from blockpress.runtime.contracts.errors import BlockPressError, QueueFull
from blockpress.runtime.sdk import many

SETTINGS = {"max_new_tokens": 32, "max_denoising_steps": 4}
HOPS = (
    "client -> queued (SDK, gRPC, gateway admit, submit script)",
    "queued -> started (replica wakes, claims, start script)",
    "started -> finished, less the engine (events, finish script)",
    "finished -> client (gateway reads, stream, SDK)",
)


def start_gateway(redis_url: str, checkpoint: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BLOCKPRESS_MAX_QUEUE": "1000000",
        "BLOCKPRESS_LOG_LEVEL": os.environ.get("BLOCKPRESS_LOG_LEVEL", "WARNING"),
    }
    cmd = [sys.executable, "-m", "blockpress.runtime.cli", "gateway", "--redis-url", redis_url]
    return subprocess.Popen([*cmd, "--model", checkpoint, "--port", str(port)], env=env)


def latency(address: str, checkpoint: str, jobs: int) -> None:
    import torch

    from blockpress.workers import DenoiseSettings, DiffusionEngine

    torch.set_num_threads(1)  # as the replica runs (torch_threads=1)
    engine = DiffusionEngine.from_pretrained(checkpoint, device="cpu")
    bare, service, inside = [], [], []
    hops: dict[str, list[float]] = {name: [] for name in HOPS}
    stuck: list[str] = []
    with Client(address, retries=60) as client:
        for i in range(jobs + 3):
            prompt, seed = f"job {i}: what is {i}*{i + 7}?", i
            t0 = time.perf_counter()
            engine.generate(prompt, DenoiseSettings(seed=seed, **SETTINGS))
            t1 = time.perf_counter()
            sent = time.time()
            try:
                result = client.generate(prompt, seed=seed, timeout=30, **SETTINGS)
            except BlockPressError as exc:  # reported, not hidden: a stuck job is a finding of its own
                stuck.append(f"job {i}: {exc}")
                continue
            t2 = time.perf_counter()
            received = time.time()
            if i < 3:  # warm-up: first calls pay for connections and lazy imports
                continue
            bare.append(t1 - t0)
            service.append(t2 - t1)
            inside.append(result.timings["total_s"])
            # Where the added time went, from the job record's clocks (one machine, one clock).
            job = client.get_job(result.job_id)
            assert job.started_at is not None and job.finished_at is not None
            engine_s = result.timings["total_s"]
            hops["client -> queued (SDK, gRPC, gateway admit, submit script)"].append(job.submitted_at - sent)
            hops["queued -> started (replica wakes, claims, start script)"].append(job.started_at - job.submitted_at)
            hops["started -> finished, less the engine (events, finish script)"].append(
                job.finished_at - job.started_at - engine_s
            )
            hops["finished -> client (gateway reads, stream, SDK)"].append(received - job.finished_at)
    added = [s - b for s, b in zip(service, bare, strict=True)]
    added_inside = [s - e for s, e in zip(service, inside, strict=True)]
    ms = 1000
    print(f"latency over {jobs} jobs ({SETTINGS}):")
    print(f"  bare engine      p50 {pct(bare, 50) * ms:7.1f} ms   p99 {pct(bare, 99) * ms:7.1f} ms")
    print(f"  full service     p50 {pct(service, 50) * ms:7.1f} ms   p99 {pct(service, 99) * ms:7.1f} ms")
    print(
        f"  added per job    p50 {pct(added, 50) * ms:7.1f} ms   p99 {pct(added, 99) * ms:7.1f} ms"
        "   (service - bare engine, same job; target p50 <= 5, p99 <= 10)"
    )
    print(
        f"  added per job    p50 {pct(added_inside, 50) * ms:7.1f} ms   p99 {pct(added_inside, 99) * ms:7.1f} ms"
        "   (service - the replica's own engine time)"
    )
    print(
        f"  added per job    p50 {(pct(service, 50) - pct(bare, 50)) * ms:7.1f} ms   "
        f"p99 {(pct(service, 99) - pct(bare, 99)) * ms:7.1f} ms   (service pN - bare engine pN: the two "
        "distributions compared, so one job's engine jitter is not counted as the service's)"
    )
    print(f"  mean added {statistics.mean(added) * ms:.1f} ms")
    print("  where the added time goes (p50 / p99 per hop):")
    for name, values in hops.items():
        if values:
            print(f"    {name:<64} {pct(values, 50) * ms:6.2f} / {pct(values, 99) * ms:6.2f} ms")
    for line in stuck:
        print(f"  NOT FINISHED within 30 s: {line}")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process `pid` has used: a figure machine noise moves
    far less than a rate does."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def admission(address: str, submits: int, concurrency: int, label: str, gateway_pid: int, bulk: bool) -> None:
    """Prints the rate of `submits` jobs queued one Submit call each, `concurrency` in flight, or (`bulk`)
    through `submit_many`."""
    async with AsyncClient(address, retries=0) as client:
        await client.submit("warm up", timeout=2.0, max_new_tokens=1)
        t0, cpu0 = time.perf_counter(), cpu_s(gateway_pid)
        if bulk:
            outcomes = await client.submit_many([f"many {i}" for i in range(submits)], timeout=3.0, max_new_tokens=1)
            errors = [o for o in outcomes if isinstance(o, BlockPressError)]
            how = f"SubmitMany calls of {many.CHUNK} jobs, {many.CALLS} in flight"
        else:
            errors = await hop_floor.submit_burst(client, submits, concurrency)
            how = f"one Submit call per job, {concurrency} in flight"
        elapsed, cpu = time.perf_counter() - t0, cpu_s(gateway_pid) - cpu0
    refused = sum(isinstance(e, QueueFull) for e in errors)
    print(
        f"admission, {label}, {'submit_many' if bulk else 'submit'}: {submits - len(errors)} jobs accepted "
        f"({refused} refused) in {elapsed:.2f} s = {(submits - len(errors)) / elapsed:,.0f} submits/s "
        f"({how}; target >= 2,000); gateway CPU {cpu / submits * 1e6:.0f} us per job"
    )
    if len(errors) > refused:
        print(f"  {len(errors) - refused} other errors, e.g. {next(e for e in errors if not isinstance(e, QueueFull))}")


def admission_paused(
    address: str, submits: int, concurrency: int, redis_url: str, pid: int, model: str, gateway_pid: int, bulk: bool
) -> None:
    """`admission` with the replica stopped for the burst, right after one of its liveness beats, so that
    the gateway goes on counting it live (a beat younger than LIVE_WINDOW_S) while it is stopped."""
    import redis as sync_redis

    from blockpress.runtime.contracts.keys import Keys
    from blockpress.runtime.queue.jobqueue import LIVE_WINDOW_S

    with sync_redis.Redis.from_url(redis_url) as r:
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up:
            beats = [float(v) for v in r.hvals(Keys().replicas(model))]
            if beats and time.time() - max(beats) < 0.1:
                break
            time.sleep(0.01)
        beat_at = max(beats)
    os.kill(pid, signal.SIGSTOP)
    try:
        asyncio.run(admission(address, submits, concurrency, "replica stopped", gateway_pid, bulk))
    finally:
        os.kill(pid, signal.SIGCONT)
    if time.time() - beat_at > LIVE_WINDOW_S:
        print(f"  (the burst outlasted the live window of {LIVE_WINDOW_S} s: lower --submits for this machine)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=60)
    p.add_argument("--submits", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--checkpoint", help="a DiffusionGemma checkpoint dir (default: a tiny random one)")
    args = p.parse_args()

    from blockpress.workers.pool import ReplicaPool

    with tempfile.TemporaryDirectory(prefix="bp-bench-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from blockpress.workers.testing import build_tiny_checkpoint

            checkpoint = str(build_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
        redis = OwnedRedis(Path(tmp))
        redis.start()
        start_ray(None)
        pool = ReplicaPool(
            checkpoint, 1, redis_url=redis.url, device="cpu", torch_threads=1, queue_options={"lease_s": 5.0}
        )
        gateway = None
        try:
            pool.start(timeout_s=300)
            port = free_port()
            gateway = start_gateway(redis.url, checkpoint, port)
            address = f"127.0.0.1:{port}"
            print(
                f"service: gateway pid {gateway.pid} on {address}, 1 replica, redis {redis.url}, {os.cpu_count()} CPUs"
            )
            latency(address, checkpoint, args.jobs)
            floor = sorted(hop_floor.floor(100, 0.02))
            print(
                f"  the same hops with no work in them (bench/hop_floor.py, now): p50 {pct(floor, 50) * 1000:.1f} ms"
                f"   p99 {pct(floor, 99) * 1000:.1f} ms"
            )
            [info] = pool.infos()
            for bulk in (False, True):
                admission_paused(
                    address, args.submits, args.concurrency, redis.url, info["pid"], info["model"], gateway.pid, bulk
                )
            for bulk in (False, True):
                asyncio.run(admission(address, args.submits, args.concurrency, "replica beside it", gateway.pid, bulk))
            ceiling = hop_floor.admission_ceiling(args.submits, args.concurrency)
            print(
                f"  the ceiling of one call per job (bench/hop_floor.py, now): {ceiling:,.0f} Submit calls/s with "
                f"{args.concurrency} in flight to a grpc.aio server that answers without doing anything"
            )
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(30)
            pool.stop(drain_s=5)
            import ray

            ray.shutdown()
            redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
