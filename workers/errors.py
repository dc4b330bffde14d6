"""Errors raised by the engine and the replicas, sorted by who must act.

    EngineError
    ├── InvalidRequest          the caller sent something bad (maps to INVALID_ARGUMENT)
    │   └── PromptTooLong       the prompt does not fit the model's context; gives both numbers
    ├── ModelConfigError        the operator pointed at something that is not a usable checkpoint
    ├── GenerationCancelled     the job was cancelled between two denoising steps
    └── EngineBroken            the engine cannot go on (CUDA error, out of memory): the replica exits

A denoising setting out of range is the runtime contract's `InvalidSettings` (an `InvalidArgument`),
raised by `DenoiseSettings` itself. `error_code` is the one place that maps these, the agent layer's and
the contract's errors to the status code name a job's `failed` event carries.
"""

from __future__ import annotations

from blockpress.agents import errors as _agents
from blockpress.runtime.contracts.errors import BlockPressError, InvalidArgument, InvalidSettings

__all__ = [
    "EngineBroken",
    "EngineError",
    "GenerationCancelled",
    "InvalidRequest",
    "InvalidSettings",
    "ModelConfigError",
    "PromptTooLong",
    "error_code",
]


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """The caller sent something the engine cannot run."""


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


# By who must act: the caller (INVALID_ARGUMENT), the operator (FAILED_PRECONDITION), or nobody but a
# retry. Anything else is a bug: INTERNAL.
_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    ((InvalidRequest, InvalidArgument, _agents.InvalidAgentTask), "INVALID_ARGUMENT"),
    ((_agents.ToolConfigError, ModelConfigError), "FAILED_PRECONDITION"),
    (GenerationCancelled, "CANCELLED"),
    (EngineBroken, "UNAVAILABLE"),
)


def error_code(exc: BaseException) -> str:
    """The status code name a job's `failed` event carries for `exc` (INVALID_ARGUMENT, ...)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, BlockPressError):
        return exc.code.name
    return "INTERNAL"
