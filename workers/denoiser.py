"""One canvas of block diffusion: the decoder forward and the sampler, step by step.

Semantics are transformers' `DiffusionGemmaGenerationMixin` for this model; the work per step is not.
transformers computes the softmax of the step's logits three times (sampling, acceptance entropy,
stopping entropy), a fourth inside the decoder for self-conditioning, and draws a multinomial sample
for all 256 positions although only the accepted ones survive renoising. Here one pass gives the
probabilities, the entropies and the argmax; the probabilities feed the next step's self-conditioning
directly; and Gumbel-max (as an exponential race) samples only the accepted positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from blockpress.workers.hf_compat import cache_kwargs

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
    sc_logits: torch.Tensor | None
    history: torch.Tensor


class Denoiser:
    """Runs the bidirectional decoder over one canvas at batch size 1, reading the encoder's KV cache."""

    def __init__(self, model: Any, *, sampler: Sampler = "gumbel") -> None:
        self.model = model
        self.decoder = model.model.decoder
        self.text_config = model.config.text_config
        self.canvas_length: int = model.config.canvas_length
        self.vocab_size: int = self.text_config.vocab_size
        self.softcap: float | None = self.text_config.final_logit_softcapping
        self.sampler = sampler
        # The self-conditioning softmax runs on logits cast to the embedding dtype; in float32 that cast
        # is a no-op and the step's own probabilities can be reused as they are.
        self._reuse_probs = self.decoder.embed_tokens.weight.dtype == torch.float32

    def decoder_logits(
        self, canvas: torch.Tensor, sc_probs: torch.Tensor | None, cache: Any, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Float32 soft-capped logits for `canvas` (1, L), self-conditioned on `sc_probs` (1, L, V)."""
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
        logits = self.model.lm_head(dec.norm(hidden)).float()
        if self.softcap:  # in place: a fresh (L, V) buffer per op costs page faults on every step
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

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
        sc_logits: torch.Tensor | None = None
        for step in range(plan.max_steps):
            check_cancel()
            with torch.inference_mode():  # per step, never across the yield (the mode is thread-local)
                out = self._step(step, canvas, sc_probs, sc_logits, history, cache, plan, position_ids, generator)
            canvas, sc_probs, sc_logits, history = out.canvas, out.sc_probs, out.sc_logits, out.history
            yield out.output
            if out.output.done:
                return

    def _step(
        self,
        step: int,
        canvas: torch.Tensor,
        sc_probs: torch.Tensor | None,
        sc_logits: torch.Tensor | None,
        history: torch.Tensor,
        cache: Any,
        plan: CanvasPlan,
        position_ids: torch.Tensor,
        generator: torch.Generator | None,
    ) -> _StepState:
        pinned = plan.pinned_mask
        # transformers counts down from N to 1 and computes the temperature as a float32 tensor;
        # doing the same keeps the scaled logits bit-identical.
        remaining = torch.tensor(plan.max_steps - step, dtype=torch.int32)
        temperature = plan.t_min + (plan.t_max - plan.t_min) * (remaining / plan.max_steps)
        if self._reuse_probs or sc_logits is None:
            logits = self.decoder_logits(canvas, sc_probs, cache, position_ids)
        else:
            logits = self.decoder_logits(canvas, sc_logits.softmax(-1, dtype=torch.float32), cache, position_ids)
        scaled = logits.div_(temperature)[0]  # (L, V)
        argmax = scaled.argmax(-1)
        probs = torch.softmax(scaled, dim=-1)
        next_sc_logits = None if self._reuse_probs else scaled.unsqueeze(0).to(self.decoder.embed_tokens.weight.dtype)
        # Entropy from log-probabilities made in place, summed as a batched dot product: no extra
        # (L, V) buffers; `scaled` is not needed after this.
        log_probs = scaled.sub_(torch.logsumexp(scaled, dim=-1, keepdim=True))
        entropy = -torch.bmm(probs.unsqueeze(1), log_probs.unsqueeze(2)).view(-1)  # (L,)
        if pinned is not None:
            entropy = entropy.masked_fill(pinned, 0.0)
            argmax = torch.where(pinned, plan.pinned_ids, argmax)  # type: ignore[arg-type]
        accept = _entropy_bound_accept(entropy, plan.entropy_bound)
        if pinned is not None:
            accept |= pinned
        next_canvas = self._next_canvas(probs, accept, argmax, plan, generator)
        mean_entropy = float(entropy.mean())
        stable = bool((history == argmax).all()) if plan.stability_threshold else True
        if plan.stability_threshold:
            history = torch.roll(history, shifts=-1, dims=0)
            history[-1] = argmax
        done = stable and mean_entropy < plan.confidence_threshold
        output = StepOutput(step + 1, argmax, int(accept.sum()), mean_entropy, done)
        return _StepState(output, next_canvas, probs.unsqueeze(0), next_sc_logits, history)

    def _next_canvas(
        self,
        probs: torch.Tensor,
        accept: torch.Tensor,
        argmax: torch.Tensor,
        plan: CanvasPlan,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Accepted positions take a sample from the denoiser; the rest are renoised uniformly."""
        length = probs.shape[0]
        if self.sampler == "multinomial":
            # transformers' draw order, all positions, for token-for-token parity with `generate()`.
            sample = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            noise = torch.randint(0, self.vocab_size, (1, length), device=probs.device, generator=generator)[0]
        else:
            noise = torch.randint(0, self.vocab_size, (length,), device=probs.device, generator=generator)
            rows = accept.nonzero().squeeze(-1)
            sample = argmax.clone()
            if rows.numel():
                race = torch.empty_like(probs[rows]).exponential_(generator=generator)
                sample[rows] = (probs[rows] / race).argmax(-1)  # Gumbel-max, as an exponential race
        if plan.pinned_mask is not None:
            sample = torch.where(plan.pinned_mask, plan.pinned_ids, sample)  # type: ignore[arg-type]
        return torch.where(accept, sample, noise).unsqueeze(0)


def _entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """The lowest-entropy positions whose summed entropy, less the largest, stays within `bound`."""
    sorted_entropy, order = torch.sort(entropy)
    keep = (torch.cumsum(sorted_entropy, 0) - sorted_entropy) <= bound
    return torch.zeros_like(keep).scatter_(0, order, keep)
