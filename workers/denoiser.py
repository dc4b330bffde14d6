"""One canvas of block diffusion: the decoder forward and the sampler, step by step.

Semantics are transformers' `DiffusionGemmaGenerationMixin` for this model; the work per step is not.
transformers computes the softmax of the step's logits three times (sampling, acceptance entropy,
stopping entropy), a fourth inside the decoder for self-conditioning, and draws a multinomial sample
for all 256 positions although only the accepted ones survive renoising. Here the sampler step
(`kernels.sampler`) gives the probabilities, the entropies and the argmax at once; the probabilities
feed the next step's self-conditioning directly; and Gumbel-max samples only the accepted positions.
On a GPU that step is a fused Triton kernel; elsewhere its torch reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from blockpress.workers.hf_compat import cache_kwargs
from blockpress.workers.kernels import KernelMode, resolve_kernels, sample_step
from blockpress.workers.kernels.graph import StepGraph
from blockpress.workers.kernels.sampler import entropy_bound_accept as _entropy_bound_accept  # noqa: F401  (tests import it here)

__all__ = ["CanvasPlan", "Denoiser", "StepOutput"]

Sampler = Literal["gumbel", "multinomial"]


@dataclass(slots=True)
class CanvasPlan:
    """What one canvas needs besides the model: its positions, limits and pinned tokens."""

    start_position: int
    max_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float
    pinned_ids: torch.Tensor | None = None
    """(canvas_length,) token ids; meaningful only where `pinned_mask` is set."""
    pinned_mask: torch.Tensor | None = None


@dataclass(slots=True)
class StepOutput:
    step: int
    argmax: torch.Tensor
    accepted: int
    mean_entropy: float
    done: bool


@dataclass(slots=True)
class _StepState:
    """What one step hands to the next."""

    output: StepOutput
    canvas: torch.Tensor
    sc_probs: torch.Tensor
    history: torch.Tensor


class Denoiser:
    """Runs the bidirectional decoder over one canvas at batch size 1, reading the encoder's KV cache."""

    def __init__(
        self, model: Any, *, sampler: Sampler = "gumbel", kernels: KernelMode | None = None, cuda_graphs: bool = True
    ) -> None:
        self.model = model
        self.decoder = model.model.decoder
        self.text_config = model.config.text_config
        self.canvas_length: int = model.config.canvas_length
        self.vocab_size: int = self.text_config.vocab_size
        self.softcap: float | None = self.text_config.final_logit_softcapping
        self.sampler = sampler
        self.kernels = resolve_kernels(kernels)
        self._sc_dtype: torch.dtype = self.decoder.embed_tokens.weight.dtype
        # Only on CUDA; a CPU step has no launch overhead to save.
        self._decoder_pass = StepGraph(self._head, enabled=cuda_graphs)

    def decoder_logits(
        self, canvas: torch.Tensor, sc_probs: torch.Tensor | None, cache: Any, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Float32 soft-capped logits for `canvas` (1, L), self-conditioned on `sc_probs` (1, L, V)."""
        logits = self._head(canvas, sc_probs, cache, position_ids).float()
        if self.softcap:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _head(
        self, canvas: torch.Tensor, sc_probs: torch.Tensor | None, cache: Any, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The output head's raw logits (1, L, V) in the model dtype; the sampler step soft-caps them."""
        dec = self.decoder
        embeds = dec.embed_tokens(canvas)
        if sc_probs is None:
            soft = torch.zeros_like(embeds)
        else:
            weight = dec.embed_tokens.weight
            soft = torch.matmul(sc_probs.to(weight.dtype), weight) * dec.embed_tokens.embed_scale.to(embeds.dtype)
        hidden = dec.self_conditioning(embeds, soft)
        rope = {kind: dec.rotary_emb(hidden, position_ids, kind) for kind in dec.unique_layer_types}
        layer_types = self.text_config.layer_types
        for i, layer in enumerate(dec.layers[: self.text_config.num_hidden_layers]):
            # No padding and a dynamic cache: transformers' mask helper returns None for both layer
            # kinds too, and the attention runs fully bidirectional over cache + canvas.
            hidden = layer(
                hidden,
                position_embeddings=rope[layer_types[i]],
                attention_mask=None,
                position_ids=position_ids,
                **cache_kwargs(cache),
            )
        return self.model.lm_head(dec.norm(hidden))

    def run(
        self,
        cache: Any,
        plan: CanvasPlan,
        generator: torch.Generator | None,
        check_cancel: Callable[[], None],
    ) -> Iterator[StepOutput]:
        """Denoises one canvas, yielding after every step; the last output's argmax is the canvas."""
        device = self.decoder.embed_tokens.weight.device
        length = self.canvas_length
        position_ids = torch.arange(
            plan.start_position, plan.start_position + length, dtype=torch.int32, device=device
        ).unsqueeze(0)
        canvas = torch.randint(0, self.vocab_size, (1, length), device=device, generator=generator)
        pinned = plan.pinned_mask
        if pinned is not None:
            assert plan.pinned_ids is not None
            canvas[0, pinned] = plan.pinned_ids[pinned]
        history = torch.full((plan.stability_threshold, length), -1, dtype=torch.long, device=device)
        sc_probs: torch.Tensor | None = None
        self._decoder_pass.new_canvas()
        for step in range(plan.max_steps):
            check_cancel()
            with torch.inference_mode():  # per step, never across the yield (the mode is thread-local)
                out = self._step(step, canvas, sc_probs, history, cache, plan, position_ids, generator)
            canvas, sc_probs, history = out.canvas, out.sc_probs, out.history
            yield out.output
            if out.output.done:
                return

    def _step(
        self,
        step: int,
        canvas: torch.Tensor,
        sc_probs: torch.Tensor | None,
        history: torch.Tensor,
        cache: Any,
        plan: CanvasPlan,
        position_ids: torch.Tensor,
        generator: torch.Generator | None,
    ) -> _StepState:
        # transformers counts down from N to 1 and computes the temperature as a float32 tensor;
        # doing the same keeps the scaled logits bit-identical.
        remaining = torch.tensor(plan.max_steps - step, dtype=torch.int32)
        temperature = plan.t_min + (plan.t_max - plan.t_min) * (remaining / plan.max_steps)
        sampled = sample_step(
            self._decoder_pass(canvas, sc_probs, cache, position_ids),
            softcap=self.softcap,
            temperature=temperature,
            entropy_bound=plan.entropy_bound,
            sc_dtype=self._sc_dtype,
            generator=generator,
            pinned_ids=plan.pinned_ids,
            pinned_mask=plan.pinned_mask,
            draw=self.sampler,
            mode=self.kernels,
        )
        argmax = sampled.argmax
        mean_entropy = float(sampled.entropy.mean())
        stable = bool((history == argmax).all()) if plan.stability_threshold else True
        if plan.stability_threshold:
            history = torch.roll(history, shifts=-1, dims=0)
            history[-1] = argmax
        done = stable and mean_entropy < plan.confidence_threshold
        output = StepOutput(step + 1, argmax, int(sampled.accept.sum()), mean_entropy, done)
        return _StepState(output, sampled.next_canvas, sampled.sc_probs, history)
