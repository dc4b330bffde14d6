"""What differs between the transformers releases the worker supports, decided once at import.

transformers 5.24 renamed the KV cache argument of DiffusionGemma's encoder, decoder layers, mask
helper and model from `past_key_values` to `cache` (the old name still works there, with a
FutureWarning, until 5.40), and the cache field of their outputs with it. 5.23 knows only the old
name. Every call in this project passes the cache as `**cache_kwargs(cache)` and reads it back with
`output_cache(out)`, so no call warns on either release.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaEncoderModel

__all__ = ["CACHE_ARG", "cache_kwargs", "output_cache"]

# inspect.signature follows the deprecation decorator's __wrapped__ to the real parameters.
CACHE_ARG: str = (
    "cache" if "cache" in inspect.signature(DiffusionGemmaEncoderModel.forward).parameters else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to a DiffusionGemma forward on this release."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a DiffusionGemma forward returned, read under this release's field name."""
    return getattr(output, CACHE_ARG)
