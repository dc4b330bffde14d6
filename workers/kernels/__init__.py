"""Fused operations of the denoising step, each a Triton kernel beside the torch reference that defines it.

- `sampler`: softcap, temperature, softmax statistics, entropy, argmax, acceptance, Gumbel-max
  samples and the self-conditioning probabilities, in two passes over the logits.
- `moe`: grouped matmul over NF4 / FP8 packed weights (the experts, and dense projections).

`dispatch` decides, in one place, which implementation runs; triton is imported only when a kernel
actually runs, so none of this needs triton on a CPU-only install.
"""

from __future__ import annotations

from blockpress.workers.kernels.dispatch import KERNEL_MODES, KernelMode, resolve_kernels, triton_available, use_triton
from blockpress.workers.kernels.moe import grouped_moe, packed_linear
from blockpress.workers.kernels.packed import PackedWeight, dequantize
from blockpress.workers.kernels.sampler import SamplerOutput, entropy_bound_accept, sample_step

__all__ = [
    "KERNEL_MODES",
    "KernelMode",
    "PackedWeight",
    "SamplerOutput",
    "dequantize",
    "entropy_bound_accept",
    "grouped_moe",
    "packed_linear",
    "resolve_kernels",
    "sample_step",
    "triton_available",
    "use_triton",
]
