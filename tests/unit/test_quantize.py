"""Quantized engines (NF4, FP8): loaded layer by layer, really packed, and computing what they claim to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from bitsandbytes.nn.parametrize import replace_parameter_4bit

from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.denoiser import Denoiser
from blockpress.workers.errors import ModelConfigError
from blockpress.workers.kernels import dequantize
from blockpress.workers.layerwise import build_layerwise, random_source
from blockpress.workers.quantize import QuantizedLinear, packed, quantize_model_, quantize_nf4, weight_bytes
from blockpress.workers.testing import tiny_config

_PACKED_DTYPE = {"nf4": torch.uint8, "fp8": torch.float8_e4m3fn}
_ELEMENTS_PER_CODE = {"nf4": 2, "fp8": 1}


@pytest.fixture(scope="module", params=["nf4", "fp8"])
def quantized(request: pytest.FixtureRequest, engine_checkpoint: Path) -> DiffusionEngine:
    return DiffusionEngine.from_pretrained(engine_checkpoint, quantization=request.param)


def _layers(engine: DiffusionEngine) -> list[tuple[Any, Any]]:
    model: Any = engine.model
    return list(zip(model.model.decoder.layers, model.model.encoder.language_model.layers, strict=True))


def test_quantized_engine_generates_and_reports_its_precision(quantized: DiffusionEngine) -> None:
    assert quantized.precision == quantized.quantization and quantized.dtype == "float32"
    settings = DenoiseSettings(seed=3, max_new_tokens=40)
    first = quantized.generate("Quantized weights still generate.", settings)
    again = quantized.generate("Quantized weights still generate.", settings)
    assert first.token_ids == again.token_ids and len(first.token_ids) > 0
    assert all(0 <= t < quantized.vocab_size for t in first.token_ids)


def test_weights_are_really_packed_and_shared_with_the_encoder(
    quantized: DiffusionEngine, engine: DiffusionEngine
) -> None:
    fmt = quantized.quantization
    assert fmt is not None
    config = quantized.model.config.text_config
    for decoder_layer, encoder_layer in _layers(quantized):
        experts = decoder_layer.experts
        codes = experts.parametrizations.gate_up_proj.original
        elements = config.num_experts * 2 * config.moe_intermediate_size * config.hidden_size
        assert codes.dtype == _PACKED_DTYPE[fmt]
        assert codes.numel() * codes.element_size() == elements // _ELEMENTS_PER_CODE[fmt]
        for name in ("q_proj", "k_proj", "o_proj"):
            assert isinstance(getattr(decoder_layer.self_attn, name), QuantizedLinear)
            assert getattr(encoder_layer.self_attn, name) is getattr(decoder_layer.self_attn, name)
        assert isinstance(decoder_layer.mlp.down_proj, QuantizedLinear)
        assert encoder_layer.experts is experts and encoder_layer.mlp is decoder_layer.mlp
        assert encoder_layer.layer_scalar is not decoder_layer.layer_scalar  # the encoder's own buffer
    full = sum(weight_bytes(layer) for layer, _ in _layers(engine))
    small = sum(weight_bytes(layer) for layer, _ in _layers(quantized))
    # fp32 -> 4 bits (+ an fp32 absmax per 64) is 1/7.1, -> 8 bits (+ a scale per row) about 1/4; the
    # router and the norms stay fp32.
    assert small < full * {"nf4": 0.18, "fp8": 0.3}[fmt], small / full


def test_the_quantized_model_computes_with_its_dequantized_weights(
    quantized: DiffusionEngine, engine_checkpoint: Path
) -> None:
    """The same decoder pass as a float model holding `dequantize(packed)`: packing, sharing and the
    packed forward paths are exact; the only loss is the format's."""
    reference = DiffusionEngine.from_pretrained(engine_checkpoint)
    float_model: Any = reference.model
    for (layer, _), float_layer in zip(_layers(quantized), float_model.model.decoder.layers, strict=True):
        for name in ("gate_up_proj", "down_proj"):
            getattr(float_layer.experts, name).data.copy_(dequantize(packed(layer.experts, name), torch.float32))
        for parent in ("self_attn", "mlp"):
            for name, child in getattr(layer, parent).named_children():
                if isinstance(child, QuantizedLinear):
                    target = getattr(getattr(float_layer, parent), name).weight
                    target.data.copy_(dequantize(packed(child, "weight"), torch.float32))
    sc = quantized.model.model.decoder.self_conditioning
    for name in ("gate_proj", "up_proj", "down_proj"):
        target = getattr(float_model.model.decoder.self_conditioning, name).weight
        target.data.copy_(dequantize(packed(getattr(sc, name), "weight"), torch.float32))
    logits = []
    length, vocab = quantized.canvas_length, quantized.vocab_size
    generator = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, vocab, (1, length), generator=generator)
    sc_probs = torch.softmax(torch.randn(1, length, vocab, generator=generator), -1)
    for engine in (quantized, reference):
        session = engine.new_session()
        session.prefill(engine.encode("one decoder pass"))
        positions = torch.arange(session.length, session.length + length).unsqueeze(0)
        with torch.inference_mode():
            logits.append(Denoiser(engine.model).decoder_logits(canvas, sc_probs, session.cache, positions))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_the_model_is_built_one_layer_at_a_time() -> None:
    """When layer i is in place (quantized), the layers after it hold no values yet (meta): the
    full-precision model never exists at once."""
    seen: list[list[bool]] = []

    def on_layer(index: int, model: Any) -> None:
        layers = model.model.decoder.layers
        assert isinstance(layers[index].mlp.up_proj, QuantizedLinear)
        seen.append([layer.experts.down_proj.is_meta for layer in layers])

    model = build_layerwise(
        tiny_config(num_layers=3),
        random_source(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        quantization="nf4",
        on_layer=on_layer,
    )
    assert seen == [[False, True, True], [False, False, True], [False, False, False]]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_nf4_one_expert_at_a_time_is_bitsandbytes_on_the_whole_tensor() -> None:
    experts = torch.nn.Module()
    experts.w = torch.nn.Parameter(torch.randn(5, 24, 64) * 0.02)
    whole = torch.nn.Module()
    whole.w = torch.nn.Parameter(experts.w.detach().clone())
    codes, state = quantize_nf4(experts.w.data)
    replace_parameter_4bit(whole, "w", quant_type="nf4", blocksize=64)
    bnb_state = whole.parametrizations.w[0].quant_state
    assert torch.equal(codes, whole.parametrizations.w.original)
    assert torch.equal(state.absmax, bnb_state.absmax) and tuple(state.shape) == tuple(bnb_state.shape)


def test_an_unknown_quantization_is_refused(engine_checkpoint: Path) -> None:
    with pytest.raises(ModelConfigError, match="quantization: 'int3'"):
        DiffusionEngine.from_pretrained(engine_checkpoint, quantization="int3")  # type: ignore[arg-type]


def test_quantizing_a_loaded_model_in_place_matches_loading_it_quantized(
    quantized: DiffusionEngine, engine_checkpoint: Path
) -> None:
    fmt = quantized.quantization
    assert fmt is not None
    model: Any = quantize_model_(DiffusionEngine.from_pretrained(engine_checkpoint).model, fmt)
    for ours, theirs in zip(quantized.model.model.decoder.layers, model.model.decoder.layers, strict=True):
        for name in ("gate_up_proj", "down_proj"):
            a, b = packed(ours.experts, name), packed(theirs.experts, name)
            assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scales, b.scales)
    assert torch.equal(quantized.model.lm_head.weight, model.lm_head.weight)
