"""The sampler step of one denoising step, over the (canvas, vocabulary) logits.

From the decoder's raw logits it computes the soft-capped, temperature-scaled distribution's argmax
and entropy per position, accepts the most confident positions (entropy bound), samples the accepted
ones, renoises the rest, and writes the probabilities the next step's self-conditioning reads.

`sample_step_reference` defines it: transformers' `DiffusionGemmaGenerationMixin` semantics with one
softmax for sampling, acceptance and stopping, and Gumbel-max (an exponential race) at the accepted
positions only. The Triton version (`_sampler_triton.py`) reads the logits twice (statistics, then
probabilities and samples) and writes nothing of vocabulary size but the self-conditioning input;
at 256 x 262,144 logits the reference's passes and (L, V) temporaries are what it saves.

Both draw the renoising tokens from the caller's generator; the reference races torch exponentials
from it, the kernel Philox uniforms from a seed drawn from it. Both are exact samples of the same
distribution, but not the same samples: a seed reproduces a run on the same implementation only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from blockpress.workers.kernels.dispatch import KernelMode, use_triton

__all__ = ["SamplerOutput", "entropy_bound_accept", "sample_step", "sample_step_reference"]

Draw = Literal["gumbel", "multinomial"]


@dataclass(slots=True)
class SamplerOutput:
    argmax: torch.Tensor
    """(L,) the distribution's argmax, pinned tokens in place."""
    entropy: torch.Tensor
    """(L,) fp32 entropy per position, 0 where pinned."""
    accept: torch.Tensor
    """(L,) bool, the positions that keep a sample."""
    next_canvas: torch.Tensor
    """(1, L) the next step's canvas: samples where accepted, uniform noise elsewhere, pins in place."""
    sc_probs: torch.Tensor
    """(1, L, V) in the embedding dtype: the next step's self-conditioning input."""


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """The lowest-entropy positions whose summed entropy, less the largest, stays within `bound`."""
    sorted_entropy, order = torch.sort(entropy)
    keep = (torch.cumsum(sorted_entropy, 0) - sorted_entropy) <= bound
    return torch.zeros_like(keep).scatter_(0, order, keep)


def sample_step_reference(
    logits: torch.Tensor,
    *,
    softcap: float | None,
    temperature: torch.Tensor | float,
    entropy_bound: float,
    sc_dtype: torch.dtype,
    generator: torch.Generator | None,
    pinned_ids: torch.Tensor | None = None,
    pinned_mask: torch.Tensor | None = None,
    draw: Draw = "gumbel",
) -> SamplerOutput:
    """The definition, in torch, for `logits` (1, L, V) straight from the head (consumed in place)."""
    scaled = logits.float()
    if softcap:  # in place: a fresh (L, V) buffer per op costs page faults on every step
        scaled.div_(softcap).tanh_().mul_(softcap)
    scaled = scaled.div_(temperature)[0]
    vocab = scaled.shape[-1]
    argmax = scaled.argmax(-1)
    probs = torch.softmax(scaled, dim=-1)
    # transformers feeds self-conditioning softmax(logits cast to the embedding dtype); in fp32 that
    # is `probs` itself.
    sc_probs = probs if sc_dtype == torch.float32 else scaled.to(sc_dtype).softmax(-1, dtype=torch.float32)
    # Entropy from log-probabilities made in place, summed as a batched dot product: no extra (L, V)
    # buffers; `scaled` is not needed after this.
    log_probs = scaled.sub_(torch.logsumexp(scaled, dim=-1, keepdim=True))
    entropy = -torch.bmm(probs.unsqueeze(1), log_probs.unsqueeze(2)).view(-1)
    if pinned_mask is not None:
        entropy = entropy.masked_fill(pinned_mask, 0.0)
        argmax = torch.where(pinned_mask, pinned_ids, argmax)  # type: ignore[arg-type]
    accept = entropy_bound_accept(entropy, entropy_bound)
    if pinned_mask is not None:
        accept |= pinned_mask
    length = probs.shape[0]
    if draw == "multinomial":
        # transformers' draw order, all positions, for token-for-token parity with `generate()`.
        sample = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        noise = torch.randint(0, vocab, (1, length), device=probs.device, generator=generator)[0]
    else:
        noise = torch.randint(0, vocab, (length,), device=probs.device, generator=generator)
        rows = accept.nonzero().squeeze(-1)
        sample = argmax.clone()
        if rows.numel():
            race = torch.empty_like(probs[rows]).exponential_(generator=generator)
            sample[rows] = (probs[rows] / race).argmax(-1)  # Gumbel-max, as an exponential race
    if pinned_mask is not None:
        sample = torch.where(pinned_mask, pinned_ids, sample)  # type: ignore[arg-type]
    next_canvas = torch.where(accept, sample, noise).unsqueeze(0)
    return SamplerOutput(argmax, entropy, accept, next_canvas, sc_probs.unsqueeze(0).to(sc_dtype))


def sample_step(
    logits: torch.Tensor,
    *,
    softcap: float | None,
    temperature: torch.Tensor | float,
    entropy_bound: float,
    sc_dtype: torch.dtype,
    generator: torch.Generator | None,
    pinned_ids: torch.Tensor | None = None,
    pinned_mask: torch.Tensor | None = None,
    draw: Draw = "gumbel",
    mode: KernelMode = "auto",
) -> SamplerOutput:
    """One sampler step: the Triton kernels where `mode` and the device allow, else the reference.

    `multinomial` (transformers' own draws, for parity tests) always runs the reference.
    """
    if draw == "gumbel" and use_triton(mode, logits.device):
        return _sample_step_triton(
            logits,
            softcap=softcap,
            temperature=float(temperature),
            entropy_bound=entropy_bound,
            sc_dtype=sc_dtype,
            generator=generator,
            pinned_ids=pinned_ids,
            pinned_mask=pinned_mask,
        )
    return sample_step_reference(
        logits,
        softcap=softcap,
        temperature=temperature,
        entropy_bound=entropy_bound,
        sc_dtype=sc_dtype,
        generator=generator,
        pinned_ids=pinned_ids,
        pinned_mask=pinned_mask,
        draw=draw,
    )


def _sample_step_triton(
    logits: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    entropy_bound: float,
    sc_dtype: torch.dtype,
    generator: torch.Generator | None,
    pinned_ids: torch.Tensor | None,
    pinned_mask: torch.Tensor | None,
) -> SamplerOutput:
    """The two kernel passes around the (L,)-sized acceptance, which stays in torch."""
    from blockpress.workers.kernels._sampler_triton import probabilities_and_samples, row_statistics

    rows = logits[0]
    length, vocab = rows.shape
    argmax, entropy, _, lse_sc = row_statistics(rows, softcap=softcap, temperature=temperature, sc_dtype=sc_dtype)
    if pinned_mask is not None:
        entropy = entropy.masked_fill(pinned_mask, 0.0)
        argmax = torch.where(pinned_mask, pinned_ids, argmax)  # type: ignore[arg-type]
    accept = entropy_bound_accept(entropy, entropy_bound)
    if pinned_mask is not None:
        accept |= pinned_mask
    noise = torch.randint(0, vocab, (length,), device=rows.device, generator=generator)
    # A device tensor, not a Python int: no host sync, and a captured graph replays a fresh draw.
    seed = torch.randint(0, 2**31 - 1, (1,), device=rows.device, generator=generator)
    sc_probs, sample = probabilities_and_samples(
        rows, lse_sc, argmax, accept, seed, softcap=softcap, temperature=temperature, sc_dtype=sc_dtype
    )
    if pinned_mask is not None:
        sample = torch.where(pinned_mask, pinned_ids, sample)  # type: ignore[arg-type]
    next_canvas = torch.where(accept, sample, noise).unsqueeze(0)
    return SamplerOutput(argmax, entropy, accept, next_canvas, sc_probs.unsqueeze(0))
