"""Loading a DiffusionGemma checkpoint, with errors that say what is wrong with it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from blockpress.workers.errors import ModelConfigError

__all__ = ["QUANTIZATIONS", "Quantization", "load_checkpoint", "resolve_device", "resolve_dtype"]

# Spelled here, not imported from .quantize, so that the unquantized path never imports bitsandbytes.
Quantization = Literal["nf4", "fp8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelConfigError(f"device: {device!r} is not a device torch knows; use auto, cpu or cuda") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device: {device!r} was asked for, but this torch build sees no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are slow on most CPUs; on a GPU bf16 is what the weights ship in.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelConfigError(f"dtype: {dtype!r} is not supported; use auto, {', '.join(_DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ModelConfigError("dtype: float16 cannot run on the CPU; use float32 or bfloat16")
    return _DTYPES[dtype]


def _check_local(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"model: {path} has no config.json; point at a DiffusionGemma checkpoint directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"model: {config_file} is not valid JSON ({exc})") from exc
    if model_type != "diffusion_gemma":
        raise ModelConfigError(
            f"model: {path} holds a {model_type!r} checkpoint; BlockPress runs DiffusionGemma "
            "(model_type 'diffusion_gemma')"
        )


def load_checkpoint(
    path_or_id: str,
    *,
    device: str,
    dtype: str,
    quantization: str | None = None,
    kernels: str = "auto",
) -> tuple[Any, Any]:
    """Returns (model, tokenizer) for a local directory or a hub id, quantized if asked."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ModelConfigError(f"quantization: {quantization!r} is not supported; use {', '.join(QUANTIZATIONS)}")
    local = Path(path_or_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelConfigError(f"model: {local} is a file; point at the checkpoint's directory")
        _check_local(local)
    elif path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise ModelConfigError(
            f"model: {path_or_id!r} is neither an existing directory nor a hub id of the form owner/name"
        )
    try:
        if quantization is not None:
            directory = local if local.exists() else _download(path_or_id)
            model = _load_quantized(directory, target, torch_dtype, quantization, kernels)
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            return model, tokenizer
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            str(local) if local.exists() else path_or_id, dtype=torch_dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else path_or_id)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only checkpoints already in the local cache load)" if offline else ""
        raise ModelConfigError(f"model: cannot load {path_or_id!r}{hint}: {exc}") from exc
    except ValueError as exc:
        raise ModelConfigError(f"model: {path_or_id!r} is not a DiffusionGemma checkpoint: {exc}") from exc
    model = model.to(target)  # type: ignore[arg-type]  # transformers' stub types .to() narrowly
    return model.eval(), tokenizer


def _download(repo_id: str) -> Path:
    """The local snapshot of a hub checkpoint (the cache only, under HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"]))


def _load_quantized(directory: Path, device: torch.device, dtype: torch.dtype, quantization: str, kernels: str) -> Any:
    """Builds the model layer by layer from the checkpoint's tensors, quantizing each layer as it lands."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from blockpress.workers.layerwise import SafetensorsSource, build_layerwise

    config = DiffusionGemmaConfig.from_pretrained(str(directory))
    model = build_layerwise(
        config,
        SafetensorsSource(directory),
        device=device,
        dtype=dtype,
        quantization=quantization,  # type: ignore[arg-type]
        kernels=kernels,  # type: ignore[arg-type]
    )
    if (directory / "generation_config.json").is_file():
        model.generation_config = DiffusionGemmaForBlockDiffusion.generation_config_class.from_pretrained(
            str(directory)
        )
    return model
