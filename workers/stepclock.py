"""`StepClock`: where a denoising step's time goes, decoder forward against sampler, at no extra sync.

The engine marks a step's start; a forward hook on the output head marks the decoder's end. On the CPU
both marks are `perf_counter` reads. On a GPU they are CUDA events recorded into the stream, read only
after the step has synchronised anyway (it reads the mean entropy back), so timing never adds a sync
and measures the kernels, not their launch. Kept out of the denoiser so that the step's code carries no
timing; a step whose head never runs through the hook (a captured CUDA graph replay) reports None.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["StepClock"]


class StepClock:
    """Splits each step into its decoder part and the rest, and times canvas commits.

    Args:
        head: the module whose forward ends the decoder's part of a step (the model's `lm_head`).
        device: the device the step runs on.
    """

    def __init__(self, head: torch.nn.Module, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._start: Any = None
        self._head: Any = None
        self._marked = False
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._head = torch.cuda.Event(enable_timing=True)
            self._commit = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._commit_s = 0.0
        self._commit_open = False
        head.register_forward_hook(self._on_head)

    def _now(self, event: Any) -> Any:
        if self._cuda:
            event.record()
            return event
        return time.perf_counter()

    def _on_head(self, module: Any, args: Any, output: Any) -> None:
        self._head = self._now(self._head)
        self._marked = True

    def start(self) -> None:
        """Marks the start of a step."""
        self._marked = False
        self._start = self._now(self._start)

    def decoder_s(self) -> float | None:
        """The decoder's part of the step since `start`; call once the step's results were read."""
        if not self._marked:
            return None
        if self._cuda:
            return float(self._start.elapsed_time(self._head)) / 1e3
        return float(self._head - self._start)

    def commit_begin(self) -> None:
        """Marks the start of encoding a canvas into the KV cache."""
        if self._cuda:
            self._commit[0].record()
        else:
            self._commit_s = time.perf_counter()
        self._commit_open = True

    def commit_end(self) -> None:
        """Marks its end; `commit_s` reads the interval after the next step has synchronised."""
        if self._cuda:
            self._commit[1].record()
        else:
            self._commit_s = time.perf_counter() - self._commit_s

    def commit_s(self) -> float:
        """Seconds of the last commit since `commit_begin`, once; 0 when there was none."""
        if not self._commit_open:
            return 0.0
        self._commit_open = False
        if self._cuda:
            return float(self._commit[0].elapsed_time(self._commit[1])) / 1e3
        return self._commit_s
