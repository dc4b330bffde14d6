"""Training and evaluating the tiny calculator checkpoint shipped in `blockpress.workers.checkpoints`.

`data` makes the synthetic conversations and the held-out split, `build` the tokenizer and configs,
`train` the denoising loop (`python -m blockpress.workers.tinytrain --out DIR`), and `evaluate` the
held-out accuracy through the real engine.
"""

from __future__ import annotations

from blockpress.workers.tinytrain.data import CALCULATOR_TOOL, Problem, held_out_problems, is_held_out

__all__ = ["CALCULATOR_TOOL", "Problem", "held_out_problems", "is_held_out"]
