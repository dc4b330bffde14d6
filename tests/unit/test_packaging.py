"""The three folders install as one namespace, `blockpress`, from a built wheel, not only from the tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"runtime": "blockpress.runtime", "workers": "blockpress.workers", "agents": "blockpress.agents"}


def _declared_packages() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared() -> None:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    missing = found - _declared_packages()
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


@pytest.mark.slow
def test_wheel_installs_the_blockpress_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("blockpress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "blockpress/workers/engine.py" in names
    assert "blockpress/workers/checkpoints/tiny-calculator/chat_template.jinja" in names
    assert "blockpress/workers/checkpoints/tiny-calculator/model.safetensors" in names  # serve's default
    assert "blockpress/runtime/queue/lua/submit.lua" in names  # the queue's atomic scripts are package data
    assert not any(n.startswith(("runtime/", "workers/", "agents/")) for n in names)  # no top-level `agents`

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    probe = (
        "import blockpress.runtime, blockpress.workers, blockpress.agents, blockpress.runtime.contracts.settings as s; "
        "print(blockpress.workers.__file__); print(s.DenoiseSettings(seed=1).seed)"
    )
    # -I: isolated mode, so neither the source tree nor the editable install can answer the import.
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "1"
