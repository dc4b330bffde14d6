"""Grouped matmul over packed (NF4 or FP8) weights: the mixture-of-experts layer and dense projections.

At batch size 1 a 256-token canvas routes 256 x 8 times over 128 experts, so a step touches every
expert and reads every weight byte: the weight bytes set the step's floor. The kernel therefore
reads each expert's packed weights once per tile of its tokens and dequantizes them in registers,
never writing a dequantized copy back to memory.

Routes are sorted by expert and each expert's run padded to a whole number of row blocks (the
layout of vLLM's `moe_align_block_size`), so every block of rows belongs to one expert. The
layout is built without a host sync, so the launch can sit inside a CUDA graph. A dense projection
is the same kernel with one expert and every row routed to it.

The formats are `packed.PackedWeight`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from blockpress.workers.kernels.dispatch import KernelMode, use_triton
from blockpress.workers.kernels.packed import PackedWeight, dequantize

__all__ = ["grouped_moe", "grouped_moe_reference", "packed_linear"]


def grouped_moe_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight,
    down: PackedWeight,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """transformers' eager experts loop over packed weights, dequantizing only the experts hit."""
    out = torch.zeros_like(hidden)
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        gate, up = F.linear(hidden[token], dequantize(gate_up, hidden.dtype, expert)).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, dequantize(down, hidden.dtype, expert))
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def grouped_moe(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight,
    down: PackedWeight,
    act: Callable[[torch.Tensor], torch.Tensor],
    *,
    gelu_tanh: bool,
    mode: KernelMode = "auto",
) -> torch.Tensor:
    """The experts' output for `hidden` (T, H) routed by `top_k_index`/`top_k_weights` (T, K).

    The kernel fuses gelu (tanh approximation, the model's `gelu_pytorch_tanh`) only; another
    activation runs the reference.
    """
    if gelu_tanh and use_triton(mode, hidden.device):
        from blockpress.workers.kernels._moe_triton import grouped_moe_triton

        return grouped_moe_triton(hidden, top_k_index, top_k_weights, gate_up, down)
    return grouped_moe_reference(hidden, top_k_index, top_k_weights, gate_up, down, act)


def packed_linear(x: torch.Tensor, w: PackedWeight, *, mode: KernelMode = "auto") -> torch.Tensor:
    """`x @ W.T` for a packed (N, K) weight."""
    if use_triton(mode, x.device):
        from blockpress.workers.kernels._moe_triton import packed_linear_triton

        return packed_linear_triton(x, w)
    return F.linear(x, dequantize(w, x.dtype))
