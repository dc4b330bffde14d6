"""Errors raised by the engine and the replicas, sorted by who must act.

    EngineError
    ├── InvalidRequest          the caller sent something bad (maps to INVALID_ARGUMENT)
    │   ├── InvalidSettings     a denoising setting out of range; names the field
    │   └── PromptTooLong       the prompt does not fit the model's context; gives both numbers
    ├── ModelConfigError        the operator pointed at something that is not a usable checkpoint
    ├── GenerationCancelled     the job was cancelled between two denoising steps
    └── EngineBroken            the engine cannot go on (CUDA error, out of memory): the replica exits

The gateway maps these to gRPC status codes in one place (`blockpress.runtime.errors`).
"""

from __future__ import annotations

__all__ = [
    "EngineBroken",
    "EngineError",
    "GenerationCancelled",
    "InvalidRequest",
    "InvalidSettings",
    "ModelConfigError",
    "PromptTooLong",
]


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """The caller sent something the engine cannot run."""


class InvalidSettings(InvalidRequest):
    """A denoising setting is out of range."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PromptTooLong(InvalidRequest):
    """The prompt plus the requested tokens do not fit the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int, max_new_tokens: int = 0) -> None:
        needed = prompt_tokens + max_new_tokens
        super().__init__(
            f"prompt: {prompt_tokens} prompt tokens + {max_new_tokens} new tokens = {needed} tokens, "
            f"more than the model's context of {context_length} tokens; shorten the prompt or lower "
            f"max_new_tokens"
        )
        self.field = "prompt"
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class ModelConfigError(EngineError):
    """The checkpoint is missing, of another architecture, or cannot run on this device."""


class GenerationCancelled(EngineError):
    """The generation was cancelled between two denoising steps."""


class EngineBroken(EngineError):
    """The engine hit an error it cannot recover from; the replica must exit and be restarted."""
