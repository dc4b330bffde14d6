"""What the gateway knows about a served model: its limits, its defaults and its tokenizer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockpress.runtime.config import model_name
from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.contracts.settings import TRANSFORMERS_DEFAULTS

__all__ = ["ModelCard", "load_model_card"]

# Special tokens a tokenizer may add around a text (<bos>, a dummy prefix), for the byte bound below.
_SPECIAL_ROOM = 16


@dataclass(frozen=True, slots=True)
class ModelCard:
    """A served model as admission sees it; `load_model_card` reads one from a checkpoint."""

    name: str
    path: str
    context_length: int
    canvas_length: int
    dtype: str
    default_max_new_tokens: int
    tokenizer: Any
    precision: str = ""
    """What the replicas run: the quantization when they pack the weights, else `dtype`."""

    def __post_init__(self) -> None:
        if not self.precision:
            object.__setattr__(self, "precision", self.dtype)

    def count_prompt(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
        tools: Sequence[dict[str, Any]] | None = None,
        limit: int | None = None,
    ) -> int:
        """Prompt tokens exactly as the engine will count them: `prompt` as is, else `messages` (and
        `tools`) rendered with the chat template, both in the chat template's form.

        With `limit`, a prompt whose UTF-8 bytes (plus room for special tokens) are within `limit` is
        not tokenized and its byte bound is returned instead: every token of a byte-level or
        byte-fallback tokenizer covers at least one byte, so such a prompt fits for certain, and the
        common short request skips the tokenizer, the largest cost of admission.

        Tokenizing takes about 1 µs per character (a second for 1 MB); callers on an event loop run
        a long prompt's count in a thread.
        """
        if prompt:
            text, special = prompt, True
        else:
            try:
                text = self.tokenizer.apply_chat_template(
                    list(messages), tools=tools or None, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # a template error is about the messages the caller sent
                raise InvalidArgument("messages", f"the chat template cannot render them ({exc})") from None
            special = False
        bound = len(text.encode()) + _SPECIAL_ROOM
        if limit is not None and bound <= limit:
            return bound
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: a fraction of the Python wrapper's cost
            # encode_batch, not encode: only the batch call releases the GIL while it runs, so a long
            # prompt counted in a thread (`Gateway.admit_data`) leaves the event loop free; and the
            # Encoding's len, not `.ids`, which would build a Python list of every id holding the GIL.
            return len(backend.encode_batch([text], add_special_tokens=special)[0])
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])


def load_model_card(path_or_id: str, *, precision: str | None = None) -> ModelCard:
    """Reads a checkpoint's config, generation config and tokenizer (no weights).

    `precision` is what the replicas run when it is not the checkpoint's dtype (`nf4`, `fp8`).
    """
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path_or_id)
    text = getattr(config, "text_config", config)
    gen_file = Path(path_or_id) / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    dtype = getattr(config, "dtype", None) or getattr(text, "dtype", None) or "bfloat16"
    return ModelCard(
        name=model_name(path_or_id),
        path=path_or_id,
        context_length=int(text.max_position_embeddings),
        canvas_length=int(getattr(config, "canvas_length", 256) or 256),
        dtype=str(dtype).removeprefix("torch."),
        default_max_new_tokens=int(generation.get("max_new_tokens") or TRANSFORMERS_DEFAULTS["max_new_tokens"]),
        tokenizer=AutoTokenizer.from_pretrained(path_or_id),
        precision=precision or "",
    )
