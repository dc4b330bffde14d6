"""The decoder pass of a denoising step as one CUDA graph, captured once per canvas and replayed per step.

At batch size 1 a step launches hundreds of small kernels (30 layers of norms, projections, routing
and attention); on an H100 their launch overhead is milliseconds a step, comparable to the weight
reads of a 4-bit step. Within one canvas every step runs the same shapes against the same KV cache,
so the pass is captured at the canvas's second step (the first, run eagerly, compiles the Triton
kernels and warms the libraries) and replayed from static buffers for the rest. The cache changes
when a canvas is committed, so the next canvas captures afresh, into the same memory pool.

A pass that cannot be captured (a host sync inside the model, as transformers' eager experts loop
has) is run eagerly from then on, with one warning; graphs never change what a step computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepGraph"]

logger = logging.getLogger(__name__)

Pass = Callable[[torch.Tensor, torch.Tensor | None, Any, torch.Tensor], torch.Tensor]


class StepGraph:
    """Runs `decoder_pass(canvas, sc_probs, cache, position_ids)`, replaying a capture where it can.

    Within a canvas (between two `new_canvas` calls) `cache` and `position_ids` must be the same
    tensors every step: the capture reads them where they are.
    """

    def __init__(self, decoder_pass: Pass, *, enabled: bool) -> None:
        self._pass = decoder_pass
        self.enabled = enabled and torch.cuda.is_available()
        self._pool: Any = None
        self._graph: Any = None
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._output: torch.Tensor | None = None

    def new_canvas(self) -> None:
        """Drops the capture: the next canvas reads another cache at other positions."""
        self._graph = self._inputs = self._output = None

    def __call__(
        self, canvas: torch.Tensor, sc_probs: torch.Tensor | None, cache: Any, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if not self.enabled or canvas.device.type != "cuda" or sc_probs is None:
            return self._pass(canvas, sc_probs, cache, position_ids)
        if self._graph is None and not self._capture(canvas, sc_probs, cache, position_ids):
            return self._pass(canvas, sc_probs, cache, position_ids)
        assert self._inputs is not None and self._output is not None
        self._inputs[0].copy_(canvas)
        self._inputs[1].copy_(sc_probs)
        self._graph.replay()
        return self._output

    def _capture(self, canvas: torch.Tensor, sc_probs: torch.Tensor, cache: Any, position_ids: torch.Tensor) -> bool:
        static_canvas, static_sc = canvas.clone(), sc_probs.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._pass(static_canvas, static_sc, cache, position_ids)
        except Exception as exc:  # a capture-unsafe op: capturing is an optimisation, never a failure
            logger.warning("denoising step not captured as a CUDA graph, running it eagerly: %s", exc)
            self.enabled = False
            torch.cuda.synchronize()
            return False
        self._graph, self._inputs, self._output = graph, (static_canvas, static_sc), output
        return True
