"""Small DiffusionGemma checkpoints of the real class with random weights, for tests and benchmarks.

Real weights cannot be downloaded where BlockPress is built, and the cost of a step does not depend on
what the weights are; what a test needs is the real architecture, a tokenizer and the chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_VISION_CONFIG",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "tiny_config",
    "wrap_tokenizer",
]

# Order fixes the ids: pad 0, eos 1, bos 2 as in the DiffusionGemma config, then Gemma 4's chat tokens.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>',
]  # fmt: skip

_TEMPLATE = Path(__file__).with_name("chat_template.jinja")

# The class always builds a Gemma 4 vision tower; at this size it is negligible (0.7M parameters) and
# text-only checkpoints never run it.
TINY_VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def tiny_config(
    *,
    vocab_size: int = 512,
    canvas_length: int = 32,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_experts: int = 4,
    top_k_experts: int = 2,
    context_length: int = 4096,
    sliding_window: int = 128,
) -> Any:
    """A `DiffusionGemmaConfig` of the real architecture at toy size (a negligible vision tower)."""
    from transformers import DiffusionGemmaConfig

    heads = max(1, hidden_size // 32)
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": 32,
        "global_head_dim": 32,
        "num_experts": num_experts,
        "top_k_experts": top_k_experts,
        "moe_intermediate_size": hidden_size,
        "sliding_window": sliding_window,
        "max_position_embeddings": context_length,
        "layer_types": layer_types,
    }
    return DiffusionGemmaConfig(
        text_config=text_config, vision_config=dict(TINY_VISION_CONFIG), canvas_length=canvas_length
    )


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer with the chat tokens and the chat template, exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size must be at least {len(vocab)} for a byte-level vocabulary")
    while len(vocab) < vocab_size:  # ids a random model can emit must still decode
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Any) -> Any:
    """A `tokenizers.Tokenizer` as a transformers tokenizer with the special tokens and the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = _TEMPLATE.read_text()
    return fast


def build_tiny_checkpoint(path: str | Path, *, seed: int = 0, **config: Any) -> Path:
    """Writes a random-weight checkpoint with tokenizer and generation config to `path`; returns it.

    Keyword arguments go to `tiny_config`. The generation config stops at `<eos>` and `<turn|>`.
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    path = Path(path)
    cfg = tiny_config(**config)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    tokenizer = build_tokenizer(cfg.text_config.vocab_size)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=64,
        max_denoising_steps=8,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        eos_token_id=[SPECIAL_TOKENS.index("<eos>"), SPECIAL_TOKENS.index("<turn|>")],
        pad_token_id=0,
        bos_token_id=2,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
