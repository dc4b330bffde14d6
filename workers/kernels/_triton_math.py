"""Device functions shared by the Triton kernels (imported with them, never on a CPU-only path)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["tanh"]


@triton.jit
def tanh(y):
    # 1 - 2 / (e^{2y} + 1) needs no libdevice, so the interpreter runs it too; past |y| = 15 tanh is
    # +-1 in fp32, and clamping there keeps e^{2y} finite (numpy would warn about the overflow).
    y = tl.minimum(tl.maximum(y, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)
