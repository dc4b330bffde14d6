"""The Triton kernel and launchers of `moe.py`: imported on first use only, so triton stays optional.

What they compute is defined by `moe.grouped_moe_reference` and `moe.packed_linear`'s reference
branch; tests/unit/test_kernels_moe.py holds them to it under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from blockpress.workers.kernels._triton_math import tanh
from blockpress.workers.kernels.packed import PackedWeight

__all__ = ["align_routes", "grouped_moe_triton", "packed_linear_triton"]

# Untuned defaults: one row block of 64 routes against 64 output channels, 64-deep K steps. Per-device
# tables belong in data files once a GPU has measured them.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
_FORMATS = {"nf4": 0, "fp8": 1}
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ w with fp32 accumulation; w is first rounded to a's dtype, as the reference dequantizes."""
    w = w.to(a.dtype)
    if UPCAST:  # triton's interpreter mishandles bf16 dots; bf16 x bf16 products are exact in fp32
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, w, input_precision="ieee")
    else:
        return tl.dot(a, w)


@triton.jit
def _load_weight(w_ptr, s_ptr, code_ptr, expert, offs_n, offs_k, N, K, blocksize, FMT: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) tile W[expert, offs_n, offs_k].T in fp32, dequantized in registers."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    flat = expert.to(tl.int64) * N * K + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    if FMT == 0:
        byte = tl.load(w_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        absmax = tl.load(s_ptr + flat // blocksize, mask=mask, other=0.0)
        return tl.load(code_ptr + nibble, mask=mask, other=0.0) * absmax
    else:
        raw = tl.load(w_ptr + flat, mask=mask, other=0)
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _grouped_gemm(
    a_ptr, w_ptr, s_ptr, code_ptr, c_ptr, rw_ptr, route_ptr, block_expert_ptr,
    N_OUT, K, num_routes, stride_am, stride_cm, blocksize,
    TOPK: tl.constexpr, A_BY_ROUTE: tl.constexpr, C_BY_ROUTE: tl.constexpr, FMT: tl.constexpr,
    FUSE_GATE: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[rows] = A[rows] @ W_e.T for one block of rows that all route to expert e.

    A row of a block is a route (token x slot) or padding (`num_routes`). With A_BY_ROUTE the
    A rows are tokens (route // TOPK), else the block's own positions; C_BY_ROUTE likewise for
    the output. FUSE_GATE reads the gate half and the up half of a [gate; up] weight (N = 2 N_OUT)
    and writes gelu_tanh(gate) * up; MUL_WEIGHT scales each row by its route's weight.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    routes = tl.load(route_ptr + offs_p)
    valid = routes < num_routes
    a_rows = (routes // TOPK) if A_BY_ROUTE else offs_p
    c_rows = routes if C_BY_ROUTE else offs_p
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_total = 2 * N_OUT if FUSE_GATE else N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = valid[:, None] & (offs_k[None, :] < K)
        a = tl.load(a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :], mask=a_mask, other=0.0)
        w = _load_weight(w_ptr, s_ptr, code_ptr, expert, offs_n, offs_k, n_total, K, blocksize, FMT)
        acc += _dot(a, tl.where(offs_n[None, :] < N_OUT, w, 0.0), IEEE, UPCAST)
        if FUSE_GATE:
            w_up = _load_weight(w_ptr, s_ptr, code_ptr, expert, offs_n + N_OUT, offs_k, n_total, K, blocksize, FMT)
            acc_up += _dot(a, w_up, IEEE, UPCAST)
    n_mask = offs_n < N_OUT
    if FMT == 1:  # per-output-channel scales factor out of the K sum
        acc *= tl.load(s_ptr + expert.to(tl.int64) * n_total + offs_n, mask=n_mask, other=0.0)[None, :]
        if FUSE_GATE:
            acc_up *= tl.load(s_ptr + expert.to(tl.int64) * n_total + N_OUT + offs_n, mask=n_mask, other=0.0)[None, :]
    out = acc
    if FUSE_GATE:
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds to the activation dtype here
        up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        out = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))) * up
    if MUL_WEIGHT:
        out *= tl.load(rw_ptr + routes, mask=valid, other=0.0)[:, None]
    c_mask = valid[:, None] & n_mask[None, :]
    tl.store(
        c_ptr + c_rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=c_mask
    )


def align_routes(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(route ids sorted by expert, each expert's run padded to `block_m`; the expert of each block).

    Padding slots hold the number of routes; blocks past the last expert's run hold -1. Sizes depend
    only on the shapes, never on the routing, so no host sync happens here.
    """
    flat = top_k_index.reshape(-1).long()
    routes = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(routes, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    blocks = triton.cdiv(routes, block_m) + num_experts
    route_ids = torch.full((blocks * block_m,), routes, dtype=torch.long, device=flat.device)
    route_ids[(ends - padded)[sorted_experts] + rank] = order
    starts = torch.arange(blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return route_ids, block_expert


def _launch(
    a: torch.Tensor,
    w: PackedWeight,
    out: torch.Tensor,
    route_ids: torch.Tensor,
    block_expert: torch.Tensor,
    route_weights: torch.Tensor | None,
    *,
    num_routes: int,
    topk: int,
    a_by_route: bool,
    c_by_route: bool,
    fuse_gate: bool,
) -> None:
    n_out = w.shape[-2] // 2 if fuse_gate else w.shape[-2]
    k = w.shape[-1]
    assert a.stride(-1) == 1 and out.stride(-1) == 1
    code = w.code if w.code is not None else w.scales  # unused by fp8; any fp32 pointer will do
    data = w.data.view(torch.uint8)
    grid = (block_expert.numel(), triton.cdiv(n_out, BLOCK_N))
    _grouped_gemm[grid](
        a, data, w.scales, code, out, route_weights if route_weights is not None else w.scales, route_ids,
        block_expert, n_out, k, num_routes, a.stride(0), out.stride(0), w.blocksize,
        TOPK=topk, A_BY_ROUTE=a_by_route, C_BY_ROUTE=c_by_route, FMT=_FORMATS[w.fmt], FUSE_GATE=fuse_gate,
        MUL_WEIGHT=route_weights is not None, IEEE=a.dtype == torch.float32, UPCAST=_INTERPRETING,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip


def grouped_moe_triton(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight,
    down: PackedWeight,
) -> torch.Tensor:
    tokens, topk = top_k_index.shape
    num_experts, two_i, _ = gate_up.shape
    hidden = hidden.contiguous()
    route_ids, block_expert = align_routes(top_k_index, num_experts, BLOCK_M)
    inter = torch.empty((route_ids.numel(), two_i // 2), dtype=hidden.dtype, device=hidden.device)
    routes = tokens * topk
    _launch(hidden, gate_up, inter, route_ids, block_expert, None, num_routes=routes, topk=topk, a_by_route=True,
            c_by_route=False, fuse_gate=True)  # fmt: skip
    per_route = torch.empty((routes, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    weights = top_k_weights.reshape(-1).float().contiguous()
    _launch(inter, down, per_route, route_ids, block_expert, weights, num_routes=routes, topk=topk, a_by_route=False,
            c_by_route=True, fuse_gate=False)  # fmt: skip
    # Summing each token's K routes in fp32 keeps the reduction order fixed (no atomics).
    return per_route.view(tokens, topk, -1).float().sum(1).to(hidden.dtype)


def packed_linear_triton(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    m = rows.shape[0]
    blocks = triton.cdiv(m, BLOCK_M)
    route_ids = torch.full((blocks * BLOCK_M,), m, dtype=torch.long, device=x.device)
    route_ids[:m] = torch.arange(m, device=x.device)
    block_expert = torch.zeros(blocks, dtype=torch.int32, device=x.device)
    out = torch.empty((m, w.shape[-2]), dtype=x.dtype, device=x.device)
    _launch(
        rows,
        w,
        out,
        route_ids,
        block_expert,
        None,
        num_routes=m,
        topk=1,
        a_by_route=True,
        c_by_route=True,
        fuse_gate=False,
    )
    return out.reshape(*x.shape[:-1], w.shape[-2])
