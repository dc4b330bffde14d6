"""Checkpoints shipped inside the package.

`TINY_CALCULATOR` is a DiffusionGemma checkpoint of a few hundred thousand parameters, trained by
`python -m blockpress.workers.tinytrain` to call a calculator tool; see its MODEL_CARD.md.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_CALCULATOR"]

TINY_CALCULATOR = Path(__file__).resolve().parent / "tiny-calculator"
