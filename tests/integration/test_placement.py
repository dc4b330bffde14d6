"""Placement by node kind on a real multi-node Ray cluster: a head and two labelled raylets, one machine.

The cluster is this module's own (its own temp dir, so no other Ray on the machine finds it, and no
`ray stop`, which would end every Ray here): each node is a `ray start --block` in a session of its
own, so killing one node is killing its process group, raylet and actor processes together, the way a
Kubernetes node or pod goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.workers.pool import ReplicaPool

pytestmark = pytest.mark.slow

QUEUE_OPTIONS = {"lease_s": 2.0, "max_deliveries": 3}
FAST = {"max_new_tokens": 32, "max_denoising_steps": 2, "seed": 1}
# Several seconds of denoising on a CPU: long enough to kill its node while it runs.
LONG = {"max_new_tokens": 1024, "max_denoising_steps": 48, "confidence_threshold": 0, "stop_token_ids": [], "seed": 2}
# The manifests' precisions per kind (k8s/base/config.yaml); both run on a CPU with the torch kernels.
KINDS = {"rtx-pro": {"quantization": "fp8"}, "dgx-spark": {"quantization": "nf4"}}
# GCS declares a killed node dead after period x threshold; the defaults (3 s x 5) only slow the test.
# Token auth on, like the session's Ray (every process reads ~/.ray/auth_token); multi-node mode on,
# which the embedded runtime's loopback start (`ray_on_loopback`) turns off for this process.
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CLUSTER_ENV = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    "RAY_AUTH_MODE": "token",
    CLUSTER_SWITCH: "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A Ray head and labelled worker nodes on this machine, each its own process group.

    Every node starts with `--node-ip-address 127.0.0.1`; in multi-node mode Ray on Linux takes the
    machine's address instead (`services.resolve_ip_for_localhost`), the same for every node.
    """

    def __init__(self) -> None:
        ray_bin = Path(sys.executable).with_name("ray")
        assert ray_bin.exists(), "the ray CLI comes with ray[default] in the venv"
        self.ray = str(ray_bin)
        # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="bpray-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, **CLUSTER_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, name: str, args: list[str]) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--block", "--disable-usage-stats"]
        with open(Path(self.temp_dir) / f"{name}.log", "wb") as log:  # the child keeps its own copy
            self.nodes[name] = subprocess.Popen(
                [self.ray, "start", *args, *common], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def start_head(self) -> None:
        self._start("head", [
            "--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
            "--temp-dir", self.temp_dir, "--min-worker-port=23000", "--max-worker-port=23999",
            f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ])  # fmt: skip

    def add_node(self, name: str, kind: str) -> None:
        # Nodes on one IP must not share a port: each agent and manager gets its own, and each node
        # its own range of worker ports.
        first = 20000 + 1000 * len(self.nodes)
        ports = [
            f"--{flag}={_free_port()}"
            for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                         "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        ]  # fmt: skip
        self._start(name, [
            "--address", self.address, "--num-cpus", "1", "--labels", f"node-kind={kind}", *ports,
            f"--min-worker-port={first}", f"--max-worker-port={first + 999}",
        ])  # fmt: skip

    def log(self, name: str) -> str:
        return (Path(self.temp_dir) / f"{name}.log").read_text(errors="replace")[-3000:]

    def kill(self, name: str) -> None:
        """The node is gone at once, raylet and actors together, as a lost machine is."""
        proc = self.nodes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)

    def stop(self) -> None:
        for name in list(self.nodes)[::-1]:
            proc = self.nodes[name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.nodes):
            proc = self.nodes.pop(name)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what SIGTERM left of that node's group
            proc.wait(timeout=20)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _alive(ray: Any) -> dict[str, str]:
    """Alive nodes: node id -> node-kind label ("" for the head)."""
    return {n["NodeID"]: n.get("Labels", {}).get("node-kind", "") for n in ray.nodes() if n["Alive"]}


@pytest.fixture
def cluster() -> Iterator[tuple[LocalCluster, Any]]:
    import ray
    from ray._private import ray_constants

    from blockpress.runtime.cli.embedded import start_ray

    # One Ray connection per process: this test's cluster replaces the session's local Ray for its
    # duration, and the session's is brought back after, for the tests that run later.
    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    saved_env = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", CLUSTER_SWITCH)}
    saved_switch = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({"RAY_AUTH_MODE": "token", CLUSTER_SWITCH: "1"})  # the driver's side of CLUSTER_ENV
    ray_constants.ENABLE_RAY_CLUSTER = True  # read at import; the driver must take the nodes' address
    c = LocalCluster()
    try:
        # Creates ~/.ray/auth_token only where none exists (a token other Ray users here share).
        subprocess.run([c.ray, "get-auth-token", "--generate"], env=c.env, check=True, capture_output=True)
        c.start_head()
        give_up = time.monotonic() + 150
        while True:
            try:
                ray.init(address=c.address, log_to_driver=False, configure_logging=False)
                break
            except (ConnectionError, RuntimeError):
                assert time.monotonic() < give_up, c.log("head")
                time.sleep(1)
        # One at a time: a node names its sockets by the first free number, so two nodes starting at
        # once on one machine can take the same one.
        for name, kind in (("n-rtx", "rtx-pro"), ("n-spark", "dgx-spark")):
            c.add_node(name, kind)
            while kind not in _alive(ray).values():
                assert c.nodes[name].poll() is None, c.log(name)
                assert time.monotonic() < give_up, f"{name} did not join: {_alive(ray)}\n{c.log(name)}"
                time.sleep(0.5)
        yield c, ray
    finally:
        ray.shutdown()
        c.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        if had_session_ray:
            start_ray(None, num_cpus=2)  # as tests/conftest.py starts it


@pytest.fixture
async def queue(redis_server: Any) -> AsyncIterator[JobQueue]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield JobQueue(client, **QUEUE_OPTIONS)
    await client.aclose()


async def _final(queue: JobQueue, job_id: str, timeout_s: float) -> Any:
    give_up = time.monotonic() + timeout_s
    while not (record := await queue.get(job_id)).state.is_final:
        assert time.monotonic() < give_up, f"{job_id} still {record.state}"
        await asyncio.sleep(0.25)
    return record


async def test_replicas_follow_node_kinds_and_survive_losing_a_node(
    cluster: tuple[LocalCluster, Any], queue: JobQueue, redis_server: Any, tiny_checkpoint: Path
) -> None:
    c, ray = cluster
    nodes = _alive(ray)
    (head,) = [node for node, kind in nodes.items() if kind == ""]
    pool = ReplicaPool(
        str(tiny_checkpoint), 2, redis_url=redis_server.url, queue_options=QUEUE_OPTIONS, device="cpu",
        torch_threads=1, name_prefix=f"p{uuid.uuid4().hex[:6]}-", placement=("rtx-pro", "dgx-spark"),
        node_kinds=KINDS,
    )  # fmt: skip
    pool.start(timeout_s=240)
    try:
        for info in pool.infos():
            # On a labelled node, never the head (which takes zero-CPU actors when nothing says no),
            # and with the engine options of the kind it landed on.
            assert info["node_id"] != head and nodes[info["node_id"]] == info["node_kind"], info
            assert info["precision"] == KINDS[info["node_kind"]]["quantization"], info

        model = pool.model
        long_job = JobSpec(job_id=f"long-{uuid.uuid4().hex[:6]}", model=model, prompt="count", settings=LONG)
        await queue.submit(long_job)
        give_up = time.monotonic() + 120
        while True:
            running = [i for i in pool.infos() if i["current_job"] == long_job.job_id]
            if running:
                break
            assert time.monotonic() < give_up, "the long job never started"
            await asyncio.sleep(0.2)
        victim_kind = running[0]["node_kind"]
        survivor_kind = "dgx-spark" if victim_kind == "rtx-pro" else "rtx-pro"
        fast = [JobSpec(job_id=f"f{i}-{uuid.uuid4().hex[:6]}", model=model, prompt=f"hi {i}", settings=FAST)
                for i in range(3)]  # fmt: skip
        for job in fast:
            await queue.submit(job)
        c.kill("n-rtx" if victim_kind == "rtx-pro" else "n-spark")  # mid-job

        for job in [long_job, *fast]:
            record = await _final(queue, job.job_id, timeout_s=200)
            assert record.state is JobState.SUCCEEDED, (job.job_id, record.state, record.error)
        record = await queue.get(long_job.job_id)
        assert record.attempt >= 2  # it was running on the lost node and ran again elsewhere
        assert len(record.result["token_ids"]) == LONG["max_new_tokens"]
        # Every replica now lives on the surviving node, restarted by Ray with that node's options.
        give_up = time.monotonic() + 60
        infos: list[dict[str, Any]] = []
        while True:
            try:
                infos = pool.infos(timeout_s=60)
            except ray.exceptions.ActorUnavailableError:  # one is still restarting on the survivor
                infos = []
            if infos and all(i["node_kind"] == survivor_kind for i in infos):
                break
            assert time.monotonic() < give_up, infos
            await asyncio.sleep(0.5)
        assert all(i["precision"] == KINDS[survivor_kind]["quantization"] for i in infos), infos
        assert await queue.depth(model) == 0
    finally:
        pool.stop(drain_s=10)
