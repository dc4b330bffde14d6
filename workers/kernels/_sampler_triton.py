"""The Triton kernels and launcher of `sampler.py`: imported on first use only, so triton stays optional.

Two passes over the logits, one program per canvas position:
1. statistics: an online max / sum-of-exponentials / exponential-weighted sum gives the
   log-normaliser and the entropy (H = lse - sum p x) in one read, beside the argmax;
2. after the (L,)-sized acceptance in torch: the self-conditioning probabilities, written once in
   the embedding dtype, and at accepted positions the Gumbel-max sample from Philox uniforms.
What they compute is defined by `sampler.sample_step_reference`; `sampler.sample_step` runs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blockpress.workers.kernels._triton_math import tanh

__all__ = ["probabilities_and_samples", "row_statistics"]

_BLOCK_V = 4096
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _scaled(logits_ptr, offs, mask, softcap, temperature, SOFTCAP: tl.constexpr):
    raw = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        raw = softcap * tanh(raw / softcap)
    return tl.where(mask, raw / temperature, float("-inf"))


@triton.jit
def _merge(m, s, t, x, mask):
    """Folds a block into the running (max, sum e^{x-m}, sum e^{x-m} x)."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    e = tl.exp(x - new_m)
    rescale = tl.exp(m - new_m)
    s = s * rescale + tl.sum(e, axis=0)
    t = t * rescale + tl.sum(e * tl.where(mask, x, 0.0), axis=0)
    return new_m, s, t


@triton.jit
def _row_statistics(
    logits_ptr, argmax_ptr, entropy_ptr, lse_ptr, lse_sc_ptr, V, stride, softcap, temperature,
    SOFTCAP: tl.constexpr, SC_ROUND: tl.constexpr, SC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    m = float("-inf")
    s = 0.0
    t = 0.0
    m_sc = float("-inf")
    s_sc = 0.0
    t_sc = 0.0
    best = float("-inf")
    best_index = 0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = _scaled(base, offs, mask, softcap, temperature, SOFTCAP)
        block_best = tl.max(x, axis=0)
        block_index = tl.argmax(x, axis=0, tie_break_left=True)
        if block_best > best:  # strict: the first maximum wins, as torch.argmax
            best = block_best
            best_index = v0 + block_index
        m, s, t = _merge(m, s, t, x, mask)
        if SC_ROUND:  # self-conditioning's softmax runs on the logits rounded to the embedding dtype
            x_sc = x.to(SC_DTYPE).to(tl.float32)
            m_sc, s_sc, t_sc = _merge(m_sc, s_sc, t_sc, x_sc, mask)
    lse = m + tl.log(s)
    tl.store(argmax_ptr + row, best_index)
    tl.store(entropy_ptr + row, lse - t / s)
    tl.store(lse_ptr + row, lse)
    if SC_ROUND:
        tl.store(lse_sc_ptr + row, m_sc + tl.log(s_sc))


@triton.jit
def _probabilities_and_samples(
    logits_ptr, sc_ptr, lse_sc_ptr, argmax_ptr, accept_ptr, seed_ptr, sample_ptr, V, stride, softcap,
    temperature, SOFTCAP: tl.constexpr, SC_ROUND: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    out = sc_ptr + row.to(tl.int64) * V
    lse_sc = tl.load(lse_sc_ptr + row)
    accepted = tl.load(accept_ptr + row) != 0
    seed = tl.load(seed_ptr)
    best = float("-inf")
    best_index = tl.load(argmax_ptr + row).to(tl.int32)  # loop-carried: one type with v0 + argmax
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = _scaled(base, offs, mask, softcap, temperature, SOFTCAP)
        x_sc = x.to(sc_ptr.dtype.element_ty).to(tl.float32) if SC_ROUND else x
        tl.store(out + offs, tl.exp(x_sc - lse_sc).to(sc_ptr.dtype.element_ty), mask=mask)
        if accepted:
            # Gumbel-max: argmax(x + G), G = -log(-log U); the floor on U (a normal float, which no
            # flush-to-zero touches) keeps the logs finite.
            u = tl.maximum(tl.rand(seed, row * V + offs), 1e-30)
            key = tl.where(mask, x - tl.log(-tl.log(u)), float("-inf"))
            block_best = tl.max(key, axis=0)
            if block_best > best:
                best = block_best
                best_index = v0 + tl.argmax(key, axis=0, tie_break_left=True)
    tl.store(sample_ptr + row, best_index)


def _block(vocab: int) -> int:
    return min(_BLOCK_V, triton.next_power_of_2(vocab))


def row_statistics(
    logits: torch.Tensor, *, softcap: float | None, temperature: float, sc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax, entropy, lse, lse of the logits rounded to `sc_dtype`) per row of `logits` (L, V): pass 1."""
    length, vocab = logits.shape
    assert logits.stride(-1) == 1
    argmax = torch.empty(length, dtype=torch.long, device=logits.device)
    entropy = torch.empty(length, dtype=torch.float32, device=logits.device)
    lse = torch.empty(length, dtype=torch.float32, device=logits.device)
    sc_round = sc_dtype != torch.float32
    lse_sc = torch.empty(length, dtype=torch.float32, device=logits.device) if sc_round else lse
    _row_statistics[(length,)](
        logits, argmax, entropy, lse, lse_sc, vocab, logits.stride(0), float(softcap or 1.0), temperature,
        SOFTCAP=bool(softcap), SC_ROUND=sc_round, SC_DTYPE=_TL_DTYPES[sc_dtype], BLOCK_V=_block(vocab),
    )  # fmt: skip
    return argmax, entropy, lse, lse_sc


def probabilities_and_samples(
    logits: torch.Tensor,
    lse_sc: torch.Tensor,
    argmax: torch.Tensor,
    accept: torch.Tensor,
    seed: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float,
    sc_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(self-conditioning probabilities (L, V) in `sc_dtype`, samples (L,)) for `logits` (L, V): pass 2.

    Rows not in `accept` keep `argmax`; `seed` (a 1-element int64 device tensor) keys the uniforms.
    """
    length, vocab = logits.shape
    sc_probs = torch.empty((length, vocab), dtype=sc_dtype, device=logits.device)
    sample = torch.empty(length, dtype=torch.long, device=logits.device)
    _probabilities_and_samples[(length,)](
        logits, sc_probs, lse_sc, argmax, accept.to(torch.int8), seed, sample, vocab, logits.stride(0),
        float(softcap or 1.0), temperature, SOFTCAP=bool(softcap), SC_ROUND=sc_dtype != torch.float32,
        BLOCK_V=_block(vocab),
    )  # fmt: skip
    return sc_probs, sample
