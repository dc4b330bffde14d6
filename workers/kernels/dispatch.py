"""Which implementation of a fused operation runs: the Triton kernel or its plain-torch reference.

One decision for the whole engine. `auto` runs Triton where it can (a CUDA tensor and an importable
triton) and the reference elsewhere; `triton` insists (and fails loudly where it cannot run); `torch`
runs the references everywhere, for comparison. The environment variable `BLOCKPRESS_KERNELS=off`
forces `torch` whatever the caller asked, so an operator can rule the kernels out without a redeploy.

Triton is imported lazily and only here: a CPU-only install never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal, get_args

import torch

__all__ = ["KERNEL_MODES", "KernelMode", "resolve_kernels", "triton_available", "use_triton"]

KernelMode = Literal["auto", "triton", "torch"]
KERNEL_MODES: tuple[str, ...] = get_args(KernelMode)
_OFF_VALUES = {"off", "0", "false", "no", "torch"}


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    # Under TRITON_INTERPRET=1 the kernels run on CPU tensors (numpy underneath); that is how the
    # tests hold them to their references on a machine without a GPU.
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernels(mode: str | None = None) -> KernelMode:
    """The mode in force: `mode` (default `auto`) unless `BLOCKPRESS_KERNELS` turns the kernels off.

    Raises:
        ValueError: `mode` or `BLOCKPRESS_KERNELS` is not one of auto, triton, torch (or off).
    """
    env = os.environ.get("BLOCKPRESS_KERNELS", "").strip().lower()
    if env in _OFF_VALUES:
        return "torch"
    if env and env not in KERNEL_MODES:
        raise ValueError(f"BLOCKPRESS_KERNELS={env!r}: use auto, triton, torch or off")
    chosen = mode or env or "auto"
    if chosen not in KERNEL_MODES:
        raise ValueError(f"kernels: {chosen!r} is not one of {', '.join(KERNEL_MODES)}")
    return chosen  # type: ignore[return-value]


def use_triton(mode: KernelMode, device: torch.device | str) -> bool:
    """Whether an operation on tensors of `device` runs its Triton kernel under `mode`.

    Raises:
        RuntimeError: `mode` is `triton` but triton is not installed, or the tensors are on the CPU
            outside the interpreter.
    """
    if mode == "torch":
        return False
    on_cuda = torch.device(device).type == "cuda"
    runnable = triton_available() and (on_cuda or _interpreting())
    if mode == "triton" and not runnable:
        why = (
            "triton is not installed" if not triton_available() else f"tensors are on {device} (set TRITON_INTERPRET=1)"
        )
        raise RuntimeError(f"kernels='triton' was asked for, but {why}")
    # `auto` never picks the interpreter: it is a test harness, orders of magnitude slower than torch.
    return runnable and (on_cuda or mode == "triton")
