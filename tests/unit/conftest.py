from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random-weight checkpoint of the real class, shared by the engine tests."""
    from blockpress.workers.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(engine_checkpoint: Path):  # type: ignore[no-untyped-def]
    from blockpress.workers import DiffusionEngine

    return DiffusionEngine.from_pretrained(engine_checkpoint)
