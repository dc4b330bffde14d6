"""`blockpress serve` as a user starts it: nothing it starts listens past 127.0.0.1, and it brings its
own redis-server back after a kill -9 (issue 17, items 9 and 10).

Real parts: the `blockpress serve` command in a process of its own (owned redis-server, local Ray,
one CPU replica on the shipped tiny checkpoint, the gateway with gRPC, HTTP and both metrics
servers on), and `ss` listing the listening sockets of every process it started (the GCS, the
raylet, Ray's agents, idle workers, the replica actor, redis-server and the gateway itself).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from blockpress.runtime import Client

pytestmark = pytest.mark.slow

LOOPBACK = re.compile(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$")


@dataclass
class Served:
    process: subprocess.Popen[str]
    address: str


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _listening(pids: set[int]) -> list[tuple[str, str, str]]:
    """(protocol, local address, process name) of each TCP/UDP socket that `pids` listen on."""
    out = subprocess.run(["ss", "-H", "-l", "-n", "-t", "-u", "-p"], capture_output=True, text=True, check=True)
    found = []
    for line in out.stdout.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids
        if owners:
            fields = line.split()
            found += [(fields[0], fields[4], _comm(pid)) for pid in sorted(owners)]
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "BLOCKPRESS_DEVICE": "cpu",
        "BLOCKPRESS_REPLICA_TORCH_THREADS": "1",
        "BLOCKPRESS_REPLICA_METRICS_PORT": "0",
        "BLOCKPRESS_GATEWAY_METRICS_PORT": "0",
    }
    command = [sys.executable, "-m", "blockpress.runtime.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--http-port", "0", "--data-dir", str(data)]  # fmt: skip
    log = (data / "serve.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        give_up, address = time.monotonic() + 280, None
        while address is None:
            line = process.stdout.readline()
            assert line or process.poll() is None, f"serve exited: {(data / 'serve.log').read_text()[-3000:]}"
            if match := re.search(r"blockpress serving .* on (\S+:\d+)$", line.strip()):
                address = match.group(1)
            assert time.monotonic() < give_up, "serve did not come up"
        yield Served(process, address)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()


def test_nothing_the_local_runtime_started_listens_beyond_loopback(served: Served) -> None:
    sockets = _listening(_descendants(served.process.pid))
    for protocol, local, name in sorted(sockets, key=lambda s: s[2]):
        print(f"{protocol:4} {local:28} {name}")
    names = {name for _, _, name in sockets}
    assert {"redis-server", "gcs_server", "raylet"} <= names, names
    assert any(name.startswith("ray::") for name in names), "the replica actor listens (Ray's core worker)"
    exposed = [s for s in sockets if not LOOPBACK.match(s[1])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def test_serve_restarts_its_redis_server_after_a_kill_and_accepts_jobs(served: Served) -> None:
    pids = _descendants(served.process.pid)
    (redis_pid,) = [pid for pid in pids if _comm(pid) == "redis-server"]
    os.kill(redis_pid, signal.SIGKILL)
    start = time.monotonic()
    with Client(served.address, timeout=120) as client:
        while True:
            try:
                result = client.generate("Hello", max_new_tokens=8, max_denoising_steps=4)
                break
            except Exception:  # UNAVAILABLE until redis-server is back; the test bounds how long
                assert time.monotonic() - start < 60, "no job accepted within 60 s of killing redis-server"
                time.sleep(0.5)
    print(f"a job was accepted and finished {time.monotonic() - start:.2f} s after the kill")
    assert result.canvases >= 1
    (restarted,) = [pid for pid in _descendants(served.process.pid) if _comm(pid) == "redis-server"]
    assert restarted != redis_pid
