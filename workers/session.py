"""A KV cache that outlives one generation, so that agent turns prefill only what is new."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from blockpress.workers.hf_compat import cache_kwargs, output_cache
from blockpress.workers.images import VisionInputs, encoder_inputs

__all__ = ["EngineSession"]


class EngineSession:
    """The encoder's KV cache and the token ids it holds.

    A prompt that starts with `token_ids` prefills only the rest; any other prompt starts over. The last
    canvas of a generation is kept in `pending` rather than encoded, because most conversations end a turn
    there: a next prompt that repeats it (the usual case: prompt, output, then the tool result) encodes it
    once, as part of its own new tokens.

    `vision` holds the images of the prompt being prefilled (set before each prefill: `attach_images`);
    the cache's own images are `image_digests` (start position to digest), so that a prompt with other
    images at the same token ids starts over.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self._encoder = model.model.encoder
        self.cache: Any = None
        self.token_ids: list[int] = []
        self.pending: list[int] = []
        self.vision: VisionInputs | None = None
        self.image_digests: dict[int, str] = {}
        self.reset()

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def reset(self) -> None:
        self.cache = DynamicCache(config=self._model.config.get_text_config(decoder=True))
        self.token_ids = []
        self.pending = []
        self.image_digests = {}

    def attach_images(self, vision: VisionInputs | None) -> None:
        """The images of the next prompt to prefill (None: it has none)."""
        self.vision = vision

    def prefill(self, prompt_ids: Sequence[int]) -> int:
        """Makes the cache hold `prompt_ids`; returns how many tokens had to be encoded."""
        cached = len(self.token_ids)
        spans = self.vision.spans if self.vision is not None else ()
        images = {s.start: s.digest for s in spans if s.start < cached}
        split = any(s.start < cached < s.start + s.length for s in spans)
        if cached and (
            len(prompt_ids) < cached
            or list(prompt_ids[:cached]) != self.token_ids
            or images != {k: v for k, v in self.image_digests.items() if k < cached}
            or split
        ):
            self.reset()
            cached = 0
        self.pending = []
        return self.append(prompt_ids[cached:])

    def append(self, token_ids: Sequence[int]) -> int:
        """Encodes `token_ids` after what the cache holds."""
        if not token_ids:
            return 0
        device = self._encoder.get_input_embeddings().weight.device
        start = len(self.token_ids)
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
        positions = torch.arange(start, start + ids.shape[1], dtype=torch.int32, device=device).unsqueeze(0)
        # As transformers' generate(): the 4D causal masks are built up front from an all-ones 2D mask.
        vision = encoder_inputs(self.vision, start, ids.shape[1], self._model)
        types = {"mm_token_type_ids": vision["mm_token_type_ids"]} if vision else {}
        masks = self._encoder.create_masks_for_generate(
            config=self._model.config,
            inputs_embeds=torch.empty((1, ids.shape[1], 0), dtype=self._model.dtype, device=device),
            attention_mask=torch.ones((1, start + ids.shape[1]), dtype=torch.bool, device=device),
            **cache_kwargs(self.cache),
            position_ids=positions,
            **types,
        )
        out = self._encoder(
            input_ids=ids, attention_mask=masks, position_ids=positions, **cache_kwargs(self.cache), **vision
        )
        self.cache = output_cache(out)
        self.token_ids += list(token_ids)
        if vision and self.vision is not None:
            end = start + ids.shape[1]
            self.image_digests.update({s.start: s.digest for s in self.vision.spans if start <= s.start < end})
        return len(token_ids)
