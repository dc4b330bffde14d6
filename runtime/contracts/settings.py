"""Denoising settings for one generation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from blockpress.runtime.contracts.errors import InvalidSettings

__all__ = ["TRANSFORMERS_DEFAULTS", "DenoiseSettings"]

# transformers' `DiffusionGemmaGenerationConfig._get_default_generation_params()`: the last resort when
# neither the request nor the checkpoint's generation_config.json sets a value.
TRANSFORMERS_DEFAULTS: Mapping[str, Any] = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "entropy_bound": 0.1,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


@dataclass(frozen=True, kw_only=True)
class DenoiseSettings:
    """How one generation denoises. `None` means: the checkpoint's default, then transformers'.

    Use `DiffusionEngine.resolve(settings)` to see the values a generation will really use.
    """

    max_new_tokens: int | None = None
    """Upper bound on new tokens; generation stops earlier at a stop token."""
    max_denoising_steps: int | None = None
    """Step limit per canvas; the adaptive stop usually ends a canvas well before it."""
    t_min: float | None = None
    """Temperature at the last step of the linear schedule."""
    t_max: float | None = None
    """Temperature at the first step of the linear schedule."""
    entropy_bound: float | None = None
    """Entropy budget for accepting the most confident positions in one step; higher accepts more."""
    stability_threshold: int | None = None
    """Steps the argmax canvas must stay unchanged before a canvas may stop early (0: no stability check)."""
    confidence_threshold: float | None = None
    """Mean entropy under which a stable canvas stops early; 0 disables the early stop (fixed steps)."""
    seed: int | None = None
    """Seed for every random draw of this generation; the same seed gives the same output."""
    stop_token_ids: tuple[int, ...] | None = None
    """Tokens that end the generation; default: the checkpoint's end-of-sequence tokens."""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Reserved for forward compatibility; must be empty."""

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _validate(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DenoiseSettings:
        """Builds settings from a plain mapping (a request, a JSON record), rejecting unknown keys."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidSettings(unknown[0], f"unknown setting; known settings are {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_mapping(self) -> dict[str, Any]:
        """The settings that are set, as JSON-friendly values."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if out["stop_token_ids"] is not None:
            out["stop_token_ids"] = list(out["stop_token_ids"])
        return {k: v for k, v in out.items() if v is not None}

    def merged_over(self, base: DenoiseSettings) -> DenoiseSettings:
        """These settings, with unset fields taken from `base`."""
        return dataclasses.replace(base, **self.to_mapping())


def _number(name: str, value: Any, *, integer: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise InvalidSettings(name, f"must be {kind}, got {value!r}")
    if not integer and not math.isfinite(value):  # isinstance above narrowed it to int | float
        raise InvalidSettings(name, f"must be finite, got {value!r}")


def _validate(s: DenoiseSettings) -> None:
    if s.extra:
        raise InvalidSettings(next(iter(s.extra)), "unknown setting")
    for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold", "seed"):
        if (value := getattr(s, name)) is not None:
            _number(name, value, integer=True)
    for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
        if (value := getattr(s, name)) is not None:
            _number(name, value, integer=False)
    if s.max_new_tokens is not None and s.max_new_tokens < 1:
        raise InvalidSettings("max_new_tokens", f"must be at least 1, got {s.max_new_tokens}")
    if s.max_denoising_steps is not None and not 1 <= s.max_denoising_steps <= 4096:
        raise InvalidSettings("max_denoising_steps", f"must be between 1 and 4096, got {s.max_denoising_steps}")
    if s.t_min is not None and s.t_min <= 0:
        raise InvalidSettings("t_min", f"must be greater than 0, got {s.t_min}")
    if s.t_max is not None and s.t_max <= 0:
        raise InvalidSettings("t_max", f"must be greater than 0, got {s.t_max}")
    if s.t_min is not None and s.t_max is not None and s.t_max < s.t_min:
        raise InvalidSettings("t_max", f"must be at least t_min ({s.t_min}), got {s.t_max}")
    if s.entropy_bound is not None and s.entropy_bound <= 0:
        raise InvalidSettings("entropy_bound", f"must be greater than 0, got {s.entropy_bound}")
    if s.stability_threshold is not None and not 0 <= s.stability_threshold <= 64:
        raise InvalidSettings("stability_threshold", f"must be between 0 and 64, got {s.stability_threshold}")
    if s.confidence_threshold is not None and s.confidence_threshold < 0:
        raise InvalidSettings("confidence_threshold", f"must be 0 (off) or more, got {s.confidence_threshold}")
    if s.seed is not None and not 0 <= s.seed < 2**63:
        raise InvalidSettings("seed", f"must be between 0 and 2**63-1, got {s.seed}")
    if s.stop_token_ids is not None:
        for tok in s.stop_token_ids:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise InvalidSettings("stop_token_ids", f"must be non-negative token ids, got {tok!r}")
