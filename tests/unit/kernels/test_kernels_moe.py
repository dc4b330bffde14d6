"""The grouped matmul over packed weights against its torch reference, under Triton's CPU interpreter.

Tolerances, relative to the output's largest magnitude: fp32 activations 1e-5 (same products, another
summation order); fp16 5e-3 and bf16 3e-2 (the reference rounds every intermediate to the activation
dtype and accumulates the experts in it; the kernel accumulates in fp32, and the interpreter
truncates to bf16 where a GPU rounds).
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from blockpress.workers.kernels import PackedWeight, dequantize, grouped_moe, packed_linear
from blockpress.workers.kernels.moe import grouped_moe_reference
from blockpress.workers.quantize import quantize_fp8

_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def kernels(interpreted: SimpleNamespace) -> ModuleType:
    return interpreted.moe  # type: ignore[no-any-return]


def _pack(weight: torch.Tensor, fmt: str) -> PackedWeight:
    if fmt == "nf4":
        data, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        return PackedWeight("nf4", data, state.absmax, tuple(weight.shape), state.blocksize, state.code)
    codes, scale = quantize_fp8(weight)
    return PackedWeight("fp8", codes, scale, tuple(weight.shape))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@pytest.mark.parametrize("shape", [(3, 8, 128), (2, 64, 64), (128, 64)])
def test_nf4_reference_dequantizes_as_bitsandbytes(shape: tuple[int, ...]) -> None:
    weight = torch.randn(shape) * 0.05
    data, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    w = PackedWeight("nf4", data, state.absmax, shape, 64, state.code)
    assert torch.equal(dequantize(w, torch.float32), bnbf.dequantize_4bit(data, state))
    if len(shape) == 3:
        assert torch.equal(dequantize(w, torch.float32, expert=1), bnbf.dequantize_4bit(data, state)[1])


def test_nf4_blocks_span_rows_when_the_width_is_not_a_multiple_of_the_block() -> None:
    """bitsandbytes blocks the flattened tensor: a 96-wide row shares a block with the next one.

    (bitsandbytes 0.50's own CPU dequantizer gets this case wrong, so the engine never calls it.)
    """
    weight = torch.randn(4, 10, 96) * 0.05
    data, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    w = PackedWeight("nf4", data, state.absmax, tuple(weight.shape), 64, state.code)
    error = (dequantize(w, torch.float32) - weight).abs().flatten()
    half_gap = (state.code[1:] - state.code[:-1]).max() / 2  # the widest NF4 step, halved
    assert bool((error <= half_gap * state.absmax.repeat_interleave(64) + 1e-7).all())


def test_fp8_keeps_every_channel_within_e4m3_precision() -> None:
    weight = torch.randn(3, 16, 40) * torch.logspace(-3, 1, 16).view(1, 16, 1)  # channels of very different size
    codes, scale = quantize_fp8(weight)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 16)
    back = dequantize(PackedWeight("fp8", codes, scale, tuple(weight.shape)), torch.float32)
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative; below 2^-6 x scale it is subnormal.
    assert bool(((back - weight).abs() <= weight.abs() * 2**-4 + scale.unsqueeze(-1) * 2**-9).all())


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("experts", "hidden", "inter", "tokens", "topk"),
    [(4, 64, 32, 5, 2), (5, 96, 80, 37, 3), (3, 128, 64, 1, 1)],
)
def test_grouped_moe_matches_the_reference(
    kernels: ModuleType, fmt: str, dtype: torch.dtype, experts: int, hidden: int, inter: int, tokens: int, topk: int
) -> None:
    torch.manual_seed(experts * hidden + tokens)
    gate_up = _pack(torch.randn(experts, 2 * inter, hidden) * 0.1, fmt)
    down = _pack(torch.randn(experts, hidden, inter) * 0.1, fmt)
    x = torch.randn(tokens, hidden).to(dtype)
    index = torch.stack([torch.randperm(experts)[:topk] for _ in range(tokens)])
    weights = torch.rand(tokens, topk)
    ours = grouped_moe(x, index, weights, gate_up, down, _gelu, gelu_tanh=True, mode="triton")
    ref = grouped_moe_reference(x, index, weights, gate_up, down, _gelu)
    assert ours.dtype == dtype and ours.shape == (tokens, hidden)
    scale = float(ref.float().abs().max())
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=_TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_one_crowded_expert_and_idle_ones(kernels: ModuleType, fmt: str) -> None:
    """70 tokens all routed to expert 1 (two row blocks of one expert); experts 0, 2 and 3 idle."""
    torch.manual_seed(0)
    experts, hidden, inter, tokens = 4, 64, 48, 70
    gate_up = _pack(torch.randn(experts, 2 * inter, hidden) * 0.1, fmt)
    down = _pack(torch.randn(experts, hidden, inter) * 0.1, fmt)
    x = torch.randn(tokens, hidden)
    index = torch.ones(tokens, 1, dtype=torch.long)
    weights = torch.full((tokens, 1), 0.5)
    ours = grouped_moe(x, index, weights, gate_up, down, _gelu, gelu_tanh=True, mode="triton")
    ref = grouped_moe_reference(x, index, weights, gate_up, down, _gelu)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_routes_are_sorted_by_expert_in_whole_blocks(kernels: ModuleType) -> None:
    index = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 2]])
    route_ids, block_expert = kernels.align_routes(index, num_experts=4, block_m=2)
    routes = index.numel()
    flat = index.reshape(-1)
    real = route_ids[route_ids < routes]
    assert sorted(real.tolist()) == list(range(routes))  # every route once
    for block, expert in enumerate(block_expert.tolist()):
        members = route_ids[block * 2 : block * 2 + 2]
        members = members[members < routes]
        if expert < 0:
            assert members.numel() == 0
        else:
            assert bool((flat[members] == expert).all())
    assert block_expert.tolist()[:5] == [0, 1, 2, 2, 2]  # 2, 1 and 5 routes; expert 3 has none


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 64, 64), (33, 96, 192), (130, 40, 64)])
def test_packed_linear_matches_the_reference(
    kernels: ModuleType, fmt: str, dtype: torch.dtype, rows: int, n: int, k: int
) -> None:
    torch.manual_seed(rows + n)
    w = _pack(torch.randn(n, k) * 0.1, fmt)
    x = torch.randn(2, rows, k).to(dtype)  # a leading batch dimension, as the model's (1, L, H)
    ours = packed_linear(x, w, mode="triton")
    ref = packed_linear(x, w, mode="torch")
    assert ours.shape == (2, rows, n)
    torch.testing.assert_close(
        ours.float(), ref.float(), rtol=0, atol=_TOLERANCE[dtype] * float(ref.float().abs().max())
    )


def test_nf4_reference_slices_an_expert_that_does_not_start_a_block() -> None:
    """An expert of 5 x 24 = 120 elements starts mid-block: the index path, same values as the whole."""
    weight = torch.randn(3, 5, 24) * 0.05
    data, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    w = PackedWeight("nf4", data, state.absmax, tuple(weight.shape), 64, state.code)
    whole = dequantize(w, torch.float32)
    for expert in range(3):
        assert torch.equal(dequantize(w, torch.float32, expert=expert), whole[expert])
