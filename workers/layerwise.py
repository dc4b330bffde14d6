"""Building a DiffusionGemma one layer at a time, so a quantized model never exists in full precision.

The model is constructed with its parameters on the meta device (its buffers, which `__init__`
computes from the config, stay real); then the parameters outside the layers are filled, and each
decoder layer in turn is filled, quantized and handed to its encoder twin. Peak memory is the
quantized model plus one layer in full precision, which is what lets the 50.8 GB bf16 model become
a ~15 GB NF4 one on a machine with 24 GB.

Where the values come from is a `TensorSource`: a checkpoint's safetensors files (reading one tensor
at a time from the memory map) or random values (benchmarks: a step's cost does not depend on them).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockpress.workers.errors import ModelConfigError
from blockpress.workers.kernels import KernelMode
from blockpress.workers.quantize import Quantization, quantize_layer_, quantize_self_conditioning_, share_layer_weights

__all__ = ["SafetensorsSource", "TensorSource", "build_layerwise", "empty_model", "random_source"]

TensorSource = Callable[[list[str], torch.Tensor], torch.Tensor]
"""(every name a parameter or buffer goes by, its meta tensor) -> its value."""


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Registers every new parameter on the meta device; buffers are left as created."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is a tie being made: keep its identity
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config: Any) -> Any:
    """A `DiffusionGemmaForBlockDiffusion` whose parameters are on the meta device (ties in place)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with _parameters_on_meta():
        return DiffusionGemmaForBlockDiffusion(config).eval()


class SafetensorsSource:
    """Tensors of a local checkpoint directory (one safetensors file or an indexed set), read lazily."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = {}
        else:
            raise ModelConfigError(f"model: {directory} has no model.safetensors (or index); cannot load it")
        files = sorted(set(weight_map.values())) or ["model.safetensors"]
        self._handles = {name: safe_open(str(directory / name), framework="pt") for name in files}
        self._where = weight_map or {key: files[0] for key in self._handles[files[0]].keys()}  # noqa: SIM118

    def __call__(self, names: list[str], like: torch.Tensor) -> torch.Tensor:
        for name in names:
            if name in self._where:
                tensor = self._handles[self._where[name]].get_tensor(name)
                if tuple(tensor.shape) != tuple(like.shape):
                    raise ModelConfigError(
                        f"model: {name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}"
                    )
                return tensor
        raise ModelConfigError(f"model: the checkpoint has no tensor {names[0]!r}")

    def has(self, names: list[str]) -> bool:
        return any(name in self._where for name in names)


def random_source(
    seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> TensorSource:
    """Normal(0, std) weights, ones for norms and scales: the shape of a model, not its knowledge.

    Values are drawn in `dtype` on `device` directly: a full-size expert tensor drawn in fp32 would
    be 2 GB more, and drawn on the host then copied, minutes more.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def make(names: list[str], like: torch.Tensor) -> torch.Tensor:
        if like.dim() <= 1:
            return torch.ones(like.shape, dtype=dtype, device=device)
        return torch.empty(like.shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)

    return make


class _Aliases:
    """Every name each of the model's tensors goes by, as constructed (ties give one tensor many)."""

    def __init__(self, model: nn.Module) -> None:
        # The tensors are held so that their ids stay theirs: a freed tensor's id can come back as
        # the id of a new one (a quantized layer's scales), which must not inherit its names.
        self._by_id: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, tensor in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]:
            self._by_id.setdefault(id(tensor), (tensor, []))[1].append(name)

    def get(self, tensor: torch.Tensor) -> list[str] | None:
        entry = self._by_id.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None


class _Filler:
    """Replaces meta parameters (and persistent buffers the source has) with real ones, keeping ties."""

    def __init__(self, model: nn.Module, source: TensorSource, device: torch.device, dtype: torch.dtype) -> None:
        self.aliases = _Aliases(model)
        self.source = source
        self.device = device
        self.dtype = dtype
        self.done: dict[int, nn.Parameter] = {}

    def _value(self, tensor: torch.Tensor) -> torch.Tensor:
        names = self.aliases.get(tensor)
        assert names is not None
        value = self.source(names, tensor)
        target = self.dtype if value.is_floating_point() else value.dtype
        return value.to(device=self.device, dtype=target)

    def fill(self, module: nn.Module) -> None:
        """Fills `module`'s own tensors (not its children's)."""
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in self.done:
                self.done[id(param)] = nn.Parameter(self._value(param), requires_grad=False)
            module._parameters[name] = self.done[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is None or (names := self.aliases.get(buffer)) is None:
                continue  # made after construction (quantization scales): already real
            persistent = name not in module._non_persistent_buffers_set
            has = getattr(self.source, "has", None)
            if persistent and has is not None and has(names):
                module._buffers[name] = self._value(buffer)
            else:
                module._buffers[name] = buffer.to(self.device)

    def fill_tree(self, module: nn.Module) -> None:
        for child in module.modules():
            self.fill(child)


def build_layerwise(
    config: Any,
    source: TensorSource,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Quantization | None,
    kernels: KernelMode = "auto",
    on_layer: Callable[[int, Any], None] | None = None,
) -> Any:
    """A model whose values come from `source`, quantized layer by layer when `quantization` is set.

    `on_layer(i, model)` runs after layer i is in place (the memory benchmark samples RSS there).

    Raises:
        ModelConfigError: the source lacks a tensor the model needs or holds one of another shape.
    """
    model = empty_model(config)
    decoder = model.model.decoder
    encoder_layers = model.model.encoder.language_model.layers
    in_layers = {id(m) for layers in (decoder.layers, encoder_layers) for m in layers.modules()}
    filler = _Filler(model, source, device, dtype)
    for module in model.modules():
        if id(module) not in in_layers:
            filler.fill(module)
    for index, (decoder_layer, encoder_layer) in enumerate(zip(decoder.layers, encoder_layers, strict=True)):
        filler.fill_tree(decoder_layer)
        if quantization is not None:
            quantize_layer_(decoder_layer, quantization, kernels=kernels)
        share_layer_weights(decoder_layer, encoder_layer)
        filler.fill_tree(encoder_layer)  # its own layer_scalar; everything else is the decoder's now
        filler.done.clear()  # the full-precision layer must not outlive its quantization
        if on_layer is not None:
            on_layer(index, model)
    if quantization is not None:
        quantize_self_conditioning_(decoder, quantization, kernels=kernels)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelConfigError(f"model: no values for {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
    return model
