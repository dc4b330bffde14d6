"""The image's install and start steps (k8s/image/image.sh), run here as the Dockerfile runs them.

No container engine runs where BlockPress is built, so the test does what the Dockerfile's build stage
does: copies the paths its COPY lines name into a fresh directory, and runs `image.sh install` into a
fresh venv, then `check` and `start smoke`. The venv sees the project's installed packages through a
.pth file, so that `pip install -r constraints/lock.txt` finds every pin satisfied without a download;
the package itself is built from the copy and installed into the fresh venv, non-editable, as in the
image, so the smoke run proves that the installed package carries the tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "k8s" / "image"


def _copied_paths() -> list[str]:
    """The repository paths the Dockerfile's build stage copies into /src."""
    build = IMAGE.joinpath("Dockerfile").read_text().split("\nFROM ")[1]
    paths = []
    for line in build.splitlines():
        if m := re.match(r"COPY (.+) /src/?\S*$", line):
            paths += m.group(1).split()
    return paths


def test_the_image_steps_install_check_and_start(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    paths = _copied_paths()
    assert {"pyproject.toml", "constraints", "workers", "runtime", "agents"} <= set(paths)
    for rel in paths:
        source = ROOT / rel
        if source.is_dir():
            shutil.copytree(source, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    # The project's packages, behind the fresh venv's own site-packages on sys.path.
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "VENV": str(venv), "PIP_NO_INDEX": "1", "TORCH_INDEX_URL": "", "BLOCKPRESS_DEVICE": "cpu"}
    script = str(IMAGE / "image.sh")

    subprocess.run([script, "install", str(src), str(venv)], check=True, env=env, timeout=240)
    installed = list(site.glob("blockpress-*.dist-info"))
    assert len(installed) == 1 and not (installed[0] / "direct_url.json").read_text().count('"editable": true')
    assert (site / "blockpress" / "workers" / "checkpoints" / "tiny-calculator" / "model.safetensors").is_file()

    check = subprocess.run([script, "check"], check=True, env=env, capture_output=True, text=True, timeout=120)
    assert f"tiny checkpoint at {site}/blockpress/workers/checkpoints/tiny-calculator" in check.stdout
    required = subprocess.run([script, "check"], env={**env, "REQUIRE_CUDA": "1"}, capture_output=True, text=True)
    assert required.returncode != 0 and "not a CUDA build" in required.stderr  # this venv has the CPU torch

    smoke = subprocess.run([script, "start", "smoke"], check=True, env=env, capture_output=True, text=True, timeout=180)
    result = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert result["model"] == "tiny-calculator" and result["device"] == "cpu" and result["tokens"] > 0

    usage = subprocess.run([script, "start", "gateway", "--help"], env=env, capture_output=True, text=True)
    assert usage.returncode == 0 and "--host" in usage.stdout  # the Deployments' entrypoint reaches the CLI


def test_the_dockerfile_runs_the_script_and_builds_for_both_architectures() -> None:
    dockerfile = IMAGE.joinpath("Dockerfile").read_text()
    assert "image.sh install /src /opt/venv" in dockerfile and "image.sh check" in dockerfile
    assert 'ENTRYPOINT ["/opt/blockpress/image.sh", "start"]' in dockerfile
    assert "--platform linux/amd64,linux/arm64" in dockerfile
    readme = (ROOT / "k8s" / "README.md").read_text()
    assert "docker buildx build --platform linux/amd64,linux/arm64 -f k8s/image/Dockerfile" in readme
