"""The `blockpress` command as a user runs it: real processes, real redis-server, real Ray."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "blockpress.runtime.cli"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_the_commands() -> None:
    out = run("--help").stdout
    for command in ("serve", "gateway", "replicas", "generate", "agent", "jobs", "cancel", "models", "demo", "trace"):
        assert command in out


def test_serve_without_redis_server_says_how_to_install_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no redis-server on this PATH
    done = run("serve", "--model", str(tiny_checkpoint), "--data-dir", str(tmp_path / "data"), env=env)
    assert done.returncode == 2
    assert "redis-server is not installed" in done.stderr
    assert "apt-get install redis-server" in done.stderr


def test_client_commands_report_an_unreachable_gateway() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run("models", "--address", f"127.0.0.1:{port}", "--timeout", "3")
    assert done.returncode == 2
    assert "UNAVAILABLE" in done.stderr


@pytest.mark.slow
def test_serve_generate_and_stop(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads while it runs
        serve = subprocess.Popen(
            [*CLI, "serve", "--model", str(tiny_checkpoint), "--port", str(port), "--data-dir", str(data)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        give_up = time.monotonic() + 240
        while run("models", "--address", address, "--timeout", "5").returncode != 0:
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < give_up, "serve did not come up in 240 s"
            time.sleep(2)
        models = run("models", "--address", address)
        assert "tiny" in models.stdout and "replicas live 1" in models.stdout

        done = run("generate", "2+2=", "--address", address, "--max-new-tokens", "16", "--seed", "3", "--drafts")
        assert done.returncode == 0, done.stderr
        assert "tokens in" in done.stderr and "[started on" in done.stderr

        missing = run("cancel", "no-such-job", "--address", address)
        assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
        assert "queued" in run("jobs", "--address", address).stdout
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    assert code == 0, log.read_text()
    assert "draining" in log.read_text()
    assert any((data / "redis").glob("appendonly*")), "the owned redis-server kept its append-only file"


@pytest.mark.slow
def test_demo_runs_a_generation_and_an_agent_task_then_stops() -> None:
    done = run("demo", "--max-new-tokens", "32", "--max-turns", "2", timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "model tiny-calculator" in out  # the shipped checkpoint, not a random-weight stand-in
    generation, _, rest = out.partition("=== agent task, tool: calculator ===")
    assert "=== generation ===" in generation and "timings: " in generation
    # The plain generation sends a chat turn with the calculator declared: the trained model calls it
    # (whether it copies the digits right is the accuracy-floor test's business).
    assert 'tool call: calculator({"expression": "' in generation, generation
    assert "stop: tool_call" in generation, generation
    agent, _, waterfall = rest.partition("=== where the agent task's time went (blockpress trace) ===")
    assert "[turn 0]" in agent and "stop: " in agent and "turns: " in agent
    assert "replica.run" in waterfall and "agent.turn" in waterfall
    assert out.rstrip().endswith("done.") and "stopped redis-server" in done.stderr
