"""The python sandbox sees a private, size-limited filesystem, never the host's data (issue 17, item 4).

The probe wrote 2 GiB into the host's RAM-backed /dev/shm, left files in /tmp and /var/tmp that
outlived the run, and read Redis's append-only file and the logs. These run the real sandbox.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from blockpress.agents.sandbox import SandboxLimits, run_python

SCRATCH = ["/tmp", "/var/tmp", "/dev/shm"]


@pytest.mark.parametrize("folder", SCRATCH)
def test_files_written_to_scratch_folders_never_reach_the_host(folder: str) -> None:
    name = f"bp-leak-{uuid.uuid4().hex}"
    result = run_python(f"open({folder!r} + '/{name}', 'w').write('x'); print('wrote')")
    assert result.outcome == "ok" and result.stdout == "wrote\n", result
    assert not os.path.exists(f"{folder}/{name}")


@pytest.mark.parametrize("folder", SCRATCH)
def test_scratch_folders_are_size_limited(folder: str) -> None:
    code = (
        "import os\n"
        f"fd = os.open({folder!r} + '/big', os.O_WRONLY | os.O_CREAT)\n"
        "chunk, total = b'x' * 2**20, 0\n"
        "try:\n"
        "    while total < 2 * 2**30:\n"
        "        total += os.write(fd, chunk)\n"
        "except OSError as exc:\n"
        "    print('stopped', exc.errno, total // 2**20)\n"
    )
    limits = SandboxLimits(tmpfs_bytes=32 * 2**20, file_bytes=4 * 2**30)
    result = run_python(code, limits)
    assert result.outcome == "ok", result
    _word, errno, mib = result.stdout.split()
    assert int(errno) == 28 and int(mib) <= 32, "ENOSPC at the tmpfs size, not the host's RAM"


def test_hidden_host_paths_are_unreadable() -> None:
    # Not under /tmp: the sandbox's private /tmp would hide it anyway, proving nothing.
    data = Path(tempfile.mkdtemp(prefix=".bp-test-data-", dir=os.getcwd()))
    request_cleanup = data
    (data / "redis").mkdir(parents=True)
    secret = data / "redis" / "appendonly.aof"
    secret.write_text("every tenant's prompts")
    secret.chmod(0o644)
    (data / "serve.log").write_text("log")
    limits = SandboxLimits(hidden_paths=(str(data),))
    code = (
        "import os\n"
        f"for op in (lambda: os.listdir({str(data)!r}), lambda: open({str(secret)!r}).read()):\n"
        "    try:\n"
        "        print('read', op())\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
    )
    try:
        result = run_python(code, limits)
    finally:
        shutil.rmtree(request_cleanup)
    assert result.outcome == "ok", result
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["refused", "refused"], lines
    assert "tenant" not in result.stdout


def test_the_sandbox_runs_without_network_and_in_its_own_pid_namespace() -> None:
    code = "import socket\ns = socket.socket()\ntry:\n    s.connect(('1.1.1.1', 53))\n"
    result = run_python(code + "except OSError as e:\n    print('no network', e.errno)\n")
    assert result.network == "isolated" and result.pid_namespace
    assert result.stdout.startswith("no network")
