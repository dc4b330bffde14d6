"""Packed weight formats and their dequantization: the definition every kernel reading them must match.

For a weight of logical shape (E, N, K) or (N, K), row-major:
- `nf4`: bitsandbytes' NF4, exactly as `bitsandbytes.functional.quantize_4bit` stores it: the
  flattened weight in blocks of `blocksize` elements, two 4-bit codes per byte (the first element
  in the high nibble), an fp32 absmax per block and the 16-entry NF4 code book.
- `fp8`: float8_e4m3fn values with an fp32 scale per output channel, shape (E, N) or (N,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Format", "PackedWeight", "dequantize"]

Format = Literal["nf4", "fp8"]


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight as stored in memory; see the module docstring for the layouts."""

    fmt: Format
    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = 64
    code: torch.Tensor | None = None
    """The NF4 code book (16 fp32 values); None for fp8."""

    @property
    def nbytes(self) -> int:
        code = 0 if self.code is None else self.code.numel() * self.code.element_size()
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size() + code


def dequantize(w: PackedWeight, dtype: torch.dtype, expert: int | None = None) -> torch.Tensor:
    """The weight (or expert `expert`'s slice of it) in `dtype`: the definition the kernel must match."""
    rows, cols = w.shape[-2], w.shape[-1]
    if w.fmt == "fp8":
        data, scales = (w.data, w.scales) if expert is None else (w.data[expert], w.scales[expert])
        return (data.float() * scales.unsqueeze(-1)).to(dtype)
    assert w.code is not None
    per_expert = rows * cols
    if expert is None:
        start, count, shape = 0, math.prod(w.shape), w.shape
    else:
        start, count, shape = expert * per_expert, per_expert, w.shape[1:]
    if start % w.blocksize == 0 and count % w.blocksize == 0 and w.blocksize % 2 == 0:
        # Whole blocks: unpack the bytes in order and scale block by block (the common case, and
        # the fast one: no per-element index arithmetic).
        packed = w.data.reshape(-1)[start // 2 : (start + count) // 2]
        nibbles = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()
        blocks = w.scales[start // w.blocksize : (start + count) // w.blocksize]
        values = (w.code[nibbles].view(-1, w.blocksize) * blocks.unsqueeze(-1)).reshape(-1)
        return values.reshape(shape).to(dtype)
    index = torch.arange(start, start + count, device=w.data.device)
    byte = w.data.reshape(-1)[index // 2].long()
    nibble = torch.where(index % 2 == 0, byte >> 4, byte & 15)
    values = w.code[nibble] * w.scales[index // w.blocksize]
    return values.reshape(shape).to(dtype)
