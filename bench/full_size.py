"""The published DiffusionGemma shape (26B-A4B), shared by the benchmarks that build it with random weights.

hidden 2816, 30 layers (5 sliding-window layers of 1024 tokens to 1 global), 16 query heads over 8
key/value heads (2 on the global layers), head_dim 256 (512 global), dense MLP 2112, 128 experts of
704 with 8 active, vocabulary 262,144, final logits soft-capped at 30, embeddings tied. Counted on the
meta device that is 25.42 B parameters: experts 22.84 B, dense 1.67 B, embeddings 0.74 B, vision 0.17 B
(transformers' default Gemma 4 vision tower; the published one is 0.15 B).
"""

from __future__ import annotations

from typing import Any

FULL_SIZE_TEXT: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "num_hidden_layers": 30,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_experts": 128,
    "top_k_experts": 8,
    "moe_intermediate_size": 704,
    "sliding_window": 1024,
    "max_position_embeddings": 262_144,
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
}
CANVAS_LENGTH = 256


def full_size_config(num_layers: int = 30) -> Any:
    """A `DiffusionGemmaConfig` of the published shape (fewer layers, same pattern, for quick checks)."""
    from transformers import DiffusionGemmaConfig

    text = dict(FULL_SIZE_TEXT, num_hidden_layers=num_layers)
    return DiffusionGemmaConfig(text_config=text, canvas_length=CANVAS_LENGTH)


def random_engine(
    config: Any,
    *,
    device: str,
    dtype: Any,
    quantization: str | None = None,
    kernels: str = "auto",
    cuda_graphs: bool = True,
    on_layer: Any = None,
) -> Any:
    """A `DiffusionEngine` over `config` with random weights drawn on `device`, quantized layer by layer."""
    import torch

    from blockpress.workers import DiffusionEngine
    from blockpress.workers.layerwise import build_layerwise, random_source
    from blockpress.workers.testing import build_tokenizer

    model = build_layerwise(
        config,
        random_source(dtype=dtype, device=device),
        device=torch.device(device),
        dtype=dtype,
        quantization=quantization,  # type: ignore[arg-type]
        kernels=kernels,  # type: ignore[arg-type]
        on_layer=on_layer,
    )
    return DiffusionEngine(
        model,
        build_tokenizer(config.text_config.vocab_size),
        name="diffusiongemma-random",
        quantization=quantization,  # type: ignore[arg-type]
        kernels=kernels,  # type: ignore[arg-type]
        cuda_graphs=cuda_graphs,
    )


def full_size_engine(*, quantization: str | None = None, kernels: str = "auto", cuda_graphs: bool = True) -> Any:
    """The published shape with random bf16 weights on the GPU."""
    import torch

    return random_engine(
        full_size_config(), device="cuda", dtype=torch.bfloat16, quantization=quantization, kernels=kernels,
        cuda_graphs=cuda_graphs,
    )  # fmt: skip
