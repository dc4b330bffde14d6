"""The engine with its kernels switched on (`kernels="triton"`), under the interpreter, against `torch`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.types import DraftEvent


@pytest.mark.parametrize("quantization", [None, "nf4", "fp8"])
def test_first_draft_agrees_and_generation_completes(
    interpreted: SimpleNamespace, engine_checkpoint: Path, quantization: str | None
) -> None:
    """The first step sees only the seed's random canvas, so both implementations must draft the same
    argmax from it; later steps sample (Philox in the kernel, torch's generator in the reference)."""
    settings = DenoiseSettings(seed=5, max_new_tokens=32, max_denoising_steps=4)
    drafts = {}
    for kernels in ("triton", "torch"):
        engine = DiffusionEngine.from_pretrained(engine_checkpoint, quantization=quantization, kernels=kernels)  # type: ignore[arg-type]
        assert engine.kernels == kernels
        events = list(engine.stream("The kernels run the same step.", settings))
        drafts[kernels] = next(e for e in events if isinstance(e, DraftEvent)).token_ids
        result = events[-1].result  # type: ignore[union-attr]
        assert 0 < len(result.token_ids) <= 32
    assert drafts["triton"] == drafts["torch"]
