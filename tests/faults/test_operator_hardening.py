"""The smaller holes of issue 17, item 10, against the real parts: the `blockpress` command, a real
redis-server, real HTTP servers on this machine.

- `BLOCKPRESS_API_KEYS=" , "` used to turn authentication off without a word; now the command refuses
  to start and says why, without echoing the keys.
- `http_get` could reach any port of an allowed host and a server trickling bytes held it far past
  its timeout; now only the default port (or one the operator listed) and one limit on the whole call.
- dead-lettered jobs had no replay command; `blockpress dead-letters [--replay JOB_ID]` lists and
  replays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from blockpress.agents import ToolRegistry
from blockpress.agents.builtins import http_get_tool
from blockpress.agents.errors import ToolFailed
from blockpress.agents.toolcalls import ToolCall
from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.queue.deadletters import dead_letters
from blockpress.runtime.queue.jobqueue import JobQueue

MODEL = "dl-model"


def _blockpress(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockpress.runtime.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("keys", [" , ", "sekrit-1, ,sekrit-2", "sekrit-1,"])
def test_blank_api_keys_stop_the_gateway_from_starting(keys: str) -> None:
    done = _blockpress("gateway", "--port", "0", "--http-port", "off", env={"BLOCKPRESS_API_KEYS": keys})
    assert done.returncode == 2, done
    assert "api_keys" in done.stderr and "blank" in done.stderr, done.stderr
    assert "sekrit" not in done.stderr + done.stdout, "the keys are never printed"


@pytest.fixture
def servers() -> Iterator[dict[str, int]]:
    """`fast`: answers at once; `trickle`: a 200 whose body comes one byte per 0.2 s, for ever;
    `slow_headers`: the status line one byte per 0.2 s."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # The client gives up mid-answer, which is what these tests want.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._answer()

        def _answer(self) -> None:
            if self.server.server_address[1] == ports.get("slow_headers"):
                for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            self.send_response(200)
            self.end_headers()
            if self.server.server_address[1] == ports.get("trickle"):
                while True:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    ports: dict[str, int] = {}
    running = []
    for name in ("fast", "trickle", "slow_headers"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        ports[name] = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread))
    yield ports
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_get_reaches_an_allowed_host_only_at_its_default_or_listed_port(servers: dict[str, int]) -> None:
    port = servers["fast"]
    with pytest.raises(ToolFailed, match="default ports"):
        http_get_tool(["127.0.0.1"]).fn(url=f"http://127.0.0.1:{port}/")
    with pytest.raises(ToolFailed, match="default ports"):
        http_get_tool([f"127.0.0.1:{port + 1}"]).fn(url=f"http://127.0.0.1:{port}/")
    with pytest.raises(ToolFailed, match="default ports"):
        http_get_tool(["127.0.0.1"]).fn(url="http://127.0.0.1:notaport/")
    assert http_get_tool([f"127.0.0.1:{port}"]).fn(url=f"http://127.0.0.1:{port}/")["text"] == "hello"
    # Port 80 of an allowed host is the default: refused here only because nothing listens on it.
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 80)) != 0:
            with pytest.raises(ToolFailed, match="request failed"):
                http_get_tool(["127.0.0.1"]).fn(url="http://127.0.0.1/")


@pytest.mark.parametrize("server", ["trickle", "slow_headers"])
def test_http_get_ends_at_its_time_limit_however_slowly_the_server_sends(servers: dict[str, int], server: str) -> None:
    port = servers[server]
    tool = http_get_tool([f"127.0.0.1:{port}"], timeout=1.0)
    # Through the registry: the call runs in the warm tool process, as in a replica.
    registry = ToolRegistry([tool])
    start = time.monotonic()
    result = registry.invoke(ToolCall("http_get", {"url": f"http://127.0.0.1:{port}/"}), ["http_get"])
    elapsed = time.monotonic() - start
    print(f"{server}: ended after {elapsed:.2f} s with a 1 s limit")
    assert not result.ok and "limit of 1 s" in result.error, result
    assert elapsed < 1.5


async def _dead_lettered(queue: JobQueue, job_id: str) -> None:
    await queue.submit(JobSpec(job_id=job_id, model=MODEL, prompt="poison"))
    for attempt in (1, 2):  # each delivery "crashes": nobody heartbeats or finishes
        claim = await queue.claim(MODEL, f"r{attempt}", block_ms=100)
        assert claim is not None
        await asyncio.sleep(0.3)
    assert await queue.claim(MODEL, "r3", block_ms=100) is None
    assert (await queue.get(job_id)).state is JobState.DEAD_LETTERED


async def test_the_dead_letters_command_lists_and_replays_a_dead_lettered_job(
    redis_client: Any, redis_server: Any
) -> None:
    queue = JobQueue(redis_client, lease_s=0.2, max_deliveries=2)
    await _dead_lettered(queue, "poison")
    url = ("--redis-url", redis_server.url)

    listed = await asyncio.to_thread(_blockpress, "dead-letters", *url)
    assert listed.returncode == 0, listed
    (line,) = listed.stdout.splitlines()
    assert line.startswith(f"poison\t{MODEL}\t2 deliveries") and "after 2 deliveries" in line, line

    replayed = await asyncio.to_thread(_blockpress, "dead-letters", "--replay", "poison", *url)
    assert replayed.returncode == 0, replayed
    assert replayed.stdout.strip() == "replayed poison as poison.replay-1 (QUEUED)"
    record = await queue.get("poison.replay-1")
    assert record.state is JobState.QUEUED and record.spec.prompt == "poison"
    claim = await queue.claim(MODEL, "r4", block_ms=200)
    assert claim is not None and claim.job_id == "poison.replay-1", "the replay is a job a replica takes"
    assert await dead_letters(queue, MODEL) == [], "a replayed job leaves the list"
    assert (await queue.get("poison")).state is JobState.DEAD_LETTERED, "the original stays final"

    again = await asyncio.to_thread(_blockpress, "dead-letters", "--replay", "poison.replay-1", *url)
    assert again.returncode == 1 and "not DEAD_LETTERED" in again.stderr, again
