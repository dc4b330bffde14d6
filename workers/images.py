"""Images as prompt context: chat messages' images through the checkpoint's vision tower.

A message of the job's `messages` may carry `images: [{"data": <base64>, "mime_type"}]`, checked at
the gateway (`runtime/gateway/images.py`). `render` turns such a conversation into prompt token ids
and the vision inputs for its prefill, as transformers' `Gemma4Processor` (DiffusionGemma's
processor) does: each image, placed before its message's text, becomes `boi`, one `image_token_id`
per soft token the image processor gives it, then `eoi` (a checkpoint whose three ids are one, as
the tiny test checkpoints', gets the soft tokens alone: the encoder counts image tokens by that id).
The checkpoint's image processor comes from its directory (`preprocessor_config.json`); a checkpoint
without one gets Gemma 4's with the vision config's patch and pooling sizes.

The session then hands the image tokens' pixel values to the encoder (`encoder_inputs`), which runs the
vision tower and puts its embeddings in place of those tokens. A KV cache holding images is reused
only by a prompt with the same images at the same places (`EngineSession.image_digests`): image tokens
all share one id, so the token ids alone cannot tell two images apart.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blockpress.workers.errors import InvalidRequest

__all__ = ["ImageSpan", "VisionInputs", "encoder_inputs", "has_images", "render"]

_SOFT_TOKENS = 280
"""Soft tokens per image for a checkpoint without a processor config: Gemma 4's default."""

_processors: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's soft tokens sit in the prompt."""

    start: int
    length: int
    digest: str
    """SHA-256 of the image's bytes: what makes two prompts' image tokens the same."""


@dataclass(frozen=True)
class VisionInputs:
    """A prompt's images as the vision tower takes them, one row per image, in prompt order."""

    pixel_values: torch.Tensor
    image_position_ids: torch.Tensor
    spans: tuple[ImageSpan, ...]


def has_images(messages: Sequence[Mapping[str, Any]] | None) -> bool:
    return any(m.get("images") for m in messages or ())


def render(
    engine: Any, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[int], VisionInputs]:
    """The prompt token ids of `messages` with their images, and the images' vision inputs.

    Raises:
        InvalidRequest: the checkpoint has no vision tower or chat template, or an image does not decode.
    """
    model, tokenizer = getattr(engine, "model", None), engine.tokenizer
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is None or getattr(config, "image_token_id", None) is None:
        raise InvalidRequest(f"messages: the checkpoint {engine.model_name!r} has no vision tower; send text only")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"messages: the checkpoint {engine.model_name!r} has no chat template")
    # A fresh marker per prompt: text in a message cannot forge an image's place.
    marker = f"<blockpress-image-{secrets.token_hex(8)}>"
    texts, pictures = [], []
    for i, m in enumerate(messages):
        out = {k: v for k, v in m.items() if k != "images"}
        for j, image in enumerate(m.get("images") or ()):
            pictures.append((f"messages[{i}].images[{j}]", base64.b64decode(image["data"])))
        out["content"] = marker * len(m.get("images") or ()) + str(m.get("content") or "")
        texts.append(out)
    assert model is not None and config is not None
    rendered = tokenizer.apply_chat_template(texts, tools=tools, add_generation_prompt=True, tokenize=False)
    pieces = rendered.split(marker)
    processed = _processor(model)(images=[_decode(where, data) for where, data in pictures], return_tensors="pt")
    soft = [int(n) for n in processed["num_soft_tokens_per_image"]]
    image_id, boi, eoi = config.image_token_id, config.boi_token_id, config.eoi_token_id
    wrap = boi is not None and eoi is not None and image_id not in (boi, eoi)
    ids: list[int] = []
    spans = []
    for k, piece in enumerate(pieces):
        text_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else []
        if image_id in text_ids:
            raise InvalidRequest("messages: the text holds the checkpoint's image token; images go in `images`")
        ids += text_ids
        if k == len(pieces) - 1:
            break
        ids += [boi] if wrap else []
        spans.append(ImageSpan(len(ids), soft[k], hashlib.sha256(pictures[k][1]).hexdigest()))
        ids += [image_id] * soft[k]
        ids += [eoi] if wrap else []
    vision = VisionInputs(processed["pixel_values"], processed["image_position_ids"], tuple(spans))
    return ids, vision


def encoder_inputs(vision: VisionInputs | None, start: int, length: int, model: Any) -> dict[str, Any]:
    """The encoder's image arguments for prompt tokens `start` to `start + length`: the pixel values of
    the images whose tokens lie there, and the token types that tell image tokens from text."""
    if vision is None:
        return {}
    end = start + length
    rows = [i for i, s in enumerate(vision.spans) if start < s.start + s.length and s.start < end]
    if not rows:
        return {}
    if any(vision.spans[i].start < start or vision.spans[i].start + vision.spans[i].length > end for i in rows):
        # The session appends whole prompts or whole prompt tails, and a cache that ends inside an image
        # is reset (`EngineSession.prefill`); a split image would scatter its features out of place.
        raise AssertionError("an image's tokens were split across two encoder calls")
    device = model.model.encoder.get_input_embeddings().weight.device
    types = torch.zeros((1, length), dtype=torch.long, device=device)
    for i in rows:
        s = vision.spans[i]
        types[0, s.start - start : s.start - start + s.length] = 1
    index = torch.tensor(rows)
    return {
        "pixel_values": vision.pixel_values[index].to(device=device, dtype=model.dtype),
        "image_position_ids": vision.image_position_ids[index].to(device),
        "mm_token_type_ids": types,
    }


def _decode(where: str, data: bytes) -> Any:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        # The gateway decoded it already; a replica that cannot is told why rather than failing opaquely.
        raise InvalidRequest(f"{where}: does not decode as an image ({exc})") from None


def _processor(model: Any) -> Any:
    """The checkpoint's image processor, loaded once per model."""
    with _lock:
        if (found := _processors.get(model)) is not None:
            return found
        path = str(getattr(model, "name_or_path", "") or "")
        processor: Any = None
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")) or os.path.isfile(
            os.path.join(path, "processor_config.json")
        ):
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(path)
        else:
            from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

            vision = model.config.vision_config
            processor = Gemma4ImageProcessorPil(
                patch_size=vision.patch_size,
                pooling_kernel_size=vision.pooling_kernel_size,
                max_soft_tokens=_soft_tokens(model),
            )
        _processors[model] = processor
        return processor


def _soft_tokens(model: Any) -> int:
    # A small checkpoint's context would be mostly one image at Gemma 4's 280 soft tokens: the tiny test
    # checkpoints (4,096 tokens) take Gemma 4's smallest setting.
    context = int(model.config.get_text_config().max_position_embeddings)
    return _SOFT_TOKENS if context >= 32_768 else 70
