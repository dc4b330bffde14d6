"""Quantized weights for the engine: bitsandbytes NF4, and float8 (e4m3) with per-channel scales.

What is quantized, per transformer layer: the attention projections, the dense MLP and the fused 3D
expert tensors (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)); and the self-conditioning MLP. The
tied embedding (the output head too) and the router stay in the compute dtype: the embedding is
looked up, not only multiplied, and routing decides which weights a token reads at all.

Both formats are stored as torch parametrizations of the original parameter, so the modules keep
their transformers classes, `state_dict()` holds the packed bytes, and reading the attribute still
gives a dequantized tensor. NF4 is bitsandbytes' own (its quantizer and parametrization, block 64, fp32
absmax, no double quantization, so that a kernel reads the absmax directly). The forward passes never read
the dequantized attribute: dense projections become `QuantizedLinear` and the experts dispatch to
`kernels.moe`, both reading the packed bytes (a Triton kernel on a GPU, the torch reference elsewhere).

Decoder and encoder layers share every weight (transformers ties them); a quantized decoder layer's
modules are handed to its encoder twin, so each weight is packed once.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import bitsandbytes.functional as bnbf
import torch
import torch.nn.utils.parametrize as P
from bitsandbytes.nn.parametrize import Bnb4bitParametrization, replace_parameter_4bit_prequantized
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from blockpress.workers.kernels import KernelMode, PackedWeight, grouped_moe, packed_linear

__all__ = [
    "QUANTIZATIONS",
    "Fp8Dequantize",
    "Quantization",
    "QuantizedLinear",
    "packed",
    "quantize_fp8",
    "quantize_layer_",
    "quantize_model_",
    "quantize_nf4",
    "quantize_self_conditioning_",
    "share_layer_weights",
    "weight_bytes",
]

Quantization = Literal["nf4", "fp8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
NF4_BLOCKSIZE = 64
EXPERTS_IMPLEMENTATION = "blockpress_packed"
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max

# Modules of a layer whose weights the encoder shares with the decoder (layer_scalar is its own).
_SHARED_LAYER_MODULES = (
    "mlp", "router", "experts", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
    "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
    "pre_feedforward_layernorm_2",
)  # fmt: skip
_SHARED_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "v_norm")


class Fp8Dequantize(nn.Module):
    """The parametrization of an fp8 weight: value = fp8 code x the scale of its output channel."""

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.float() * self.scale.unsqueeze(-1)).to(self.dtype)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, fp32 scale per output channel) for a (..., N, K) weight.

    The scale maps each channel's largest magnitude to e4m3's largest finite value (448). Experts
    go one at a time so the fp32 temporaries stay one expert's size.
    """
    if weight.dim() == 3:
        pairs = [quantize_fp8(w) for w in weight]
        return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])
    scale = weight.abs().amax(-1).float().clamp(min=1e-12) / _FP8_MAX
    return (weight.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(packed codes, bitsandbytes QuantState) for `weight`, exactly as `quantize_4bit` makes them.

    A 3D expert tensor goes one expert at a time when its experts fill whole blocks (the full-size
    model's do): the bytes are the same as quantizing it whole, without the whole tensor's fp32
    temporaries (8 GB for one full-size `gate_up_proj` on the CPU).
    """
    if weight.dim() != 3 or weight[0].numel() % NF4_BLOCKSIZE:
        return bnbf.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4")
    parts = [bnbf.quantize_4bit(expert, blocksize=NF4_BLOCKSIZE, quant_type="nf4") for expert in weight]
    state = parts[0][1]
    state.absmax = torch.cat([s.absmax for _, s in parts])
    state.shape = weight.shape
    return torch.cat([codes for codes, _ in parts]), state


def _quantize_parameter(module: nn.Module, name: str, quantization: Quantization, dtype: torch.dtype) -> None:
    if quantization == "nf4":
        weight = getattr(module, name).data
        codes, state = quantize_nf4(weight)
        setattr(module, name, nn.Parameter(codes, requires_grad=False))
        del weight
        # bitsandbytes' own parametrization (what `replace_parameter_4bit` registers), given our codes.
        replace_parameter_4bit_prequantized(module, name, state.as_dict(packed=True), codes.device)
        return
    codes, scale = quantize_fp8(getattr(module, name).data)
    setattr(module, name, nn.Parameter(codes, requires_grad=False))
    P.register_parametrization(module, name, Fp8Dequantize(scale, dtype), unsafe=True)


def packed(module: nn.Module, name: str) -> PackedWeight:
    """The packed form of `module.<name>`, as the kernels read it."""
    parametrizations: Any = module.parametrizations
    entry = parametrizations[name]
    how = entry[0]
    codes = entry.original
    if isinstance(how, Bnb4bitParametrization):
        state = how.quant_state
        return PackedWeight("nf4", codes, state.absmax, tuple(state.shape), state.blocksize, state.code)
    assert isinstance(how, Fp8Dequantize)
    return PackedWeight("fp8", codes, how.scale, tuple(codes.shape))


class QuantizedLinear(nn.Module):
    """A bias-free `nn.Linear` whose weight is stored packed; its forward reads the packed bytes."""

    def __init__(self, linear: nn.Linear, quantization: Quantization, *, kernels: KernelMode = "auto") -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantizedLinear: DiffusionGemma's projections have no bias")
        self.in_features: int = linear.in_features
        self.out_features: int = linear.out_features
        self.weight = linear.weight
        self.kernels: KernelMode = kernels
        _quantize_parameter(self, "weight", quantization, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, packed(self, "weight"), mode=self.kernels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {packed(self, 'weight').fmt}"


def _packed_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts interface over packed weights (registered as `blockpress_packed`)."""
    return grouped_moe(
        hidden_states,
        top_k_index,
        top_k_weights,
        packed(self, "gate_up_proj"),
        packed(self, "down_proj"),
        self.act_fn,
        gelu_tanh=self.config.hidden_activation == "gelu_pytorch_tanh",
        mode=getattr(self, "kernels", "auto"),
    )


ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPLEMENTATION] = _packed_experts_forward


def _quantize_linears(parent: Any, quantization: Quantization, kernels: KernelMode) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.Linear):
            setattr(parent, name, QuantizedLinear(child, quantization, kernels=kernels))


def quantize_layer_(layer: nn.Module, quantization: Quantization, *, kernels: KernelMode = "auto") -> None:
    """Quantizes one decoder layer in place, on the device its weights are on."""
    experts: Any = layer.experts
    dtype = experts.gate_up_proj.dtype
    _quantize_linears(layer.self_attn, quantization, kernels)
    _quantize_linears(layer.mlp, quantization, kernels)
    for name in ("gate_up_proj", "down_proj"):
        _quantize_parameter(experts, name, quantization, dtype)
    experts.kernels = kernels
    experts.config._experts_implementation = EXPERTS_IMPLEMENTATION


def share_layer_weights(decoder_layer: nn.Module, encoder_layer: nn.Module) -> None:
    """Makes the encoder layer use the decoder layer's weight-holding modules, as transformers ties them."""
    for name in _SHARED_LAYER_MODULES:
        setattr(encoder_layer, name, getattr(decoder_layer, name))
    for name in _SHARED_ATTENTION_MODULES:
        setattr(encoder_layer.self_attn, name, getattr(decoder_layer.self_attn, name))


def quantize_model_(model: Any, quantization: Quantization, *, kernels: KernelMode = "auto") -> Any:
    """Quantizes a loaded `DiffusionGemmaForBlockDiffusion` in place, one layer at a time; returns it.

    Each layer's full-precision weights are freed as soon as its packed ones exist, so the peak is
    the model as loaded plus one layer's temporaries.
    """
    decoder = model.model.decoder
    encoder_layers = model.model.encoder.language_model.layers
    for decoder_layer, encoder_layer in zip(decoder.layers, encoder_layers, strict=True):
        quantize_layer_(decoder_layer, quantization, kernels=kernels)
        share_layer_weights(decoder_layer, encoder_layer)
    quantize_self_conditioning_(decoder, quantization, kernels=kernels)
    return model


def quantize_self_conditioning_(
    decoder: nn.Module, quantization: Quantization, *, kernels: KernelMode = "auto"
) -> None:
    """Quantizes the decoder's self-conditioning MLP in place."""
    _quantize_linears(decoder.self_conditioning, quantization, kernels)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds: parameters, buffers and NF4 quantization states."""
    seen: set[tuple[int, Any]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.is_meta:
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for module in model.modules():
        for entry in getattr(module, "parametrizations", {}).values():
            for how in entry:
                if isinstance(how, Bnb4bitParametrization):
                    add(how.quant_state.absmax)
                    add(how.quant_state.code)
    return total
