"""`Engine`: the seam between the job loop and whatever generates tokens.

The runner, the traced wrapper and the engine-backed agent model depend on this Protocol, never on
`DiffusionEngine` itself, so that they import no torch and tests can run them on
`blockpress.workers.testing.FakeEngine`. `DiffusionEngine` satisfies it structurally (mypy checks that
below), and `TracedEngine` wraps any `Engine` into another.

Cancelling is part of each call rather than a method: one engine runs one generation at a time, and a
`cancel` signal handed to `stream` belongs to that generation alone, so a late cancel can never stop the
job after it. An engine that cannot go on says so by raising `EngineBroken` from `stream`; the replica
then exits and Ray starts a fresh one, which is the whole of its health story.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.workers.types import GenerationResult, StreamEvent

if TYPE_CHECKING:
    from blockpress.workers.engine import DiffusionEngine

__all__ = ["CancelSignal", "Engine", "Prompt", "Session"]

CancelSignal = Callable[[], bool] | threading.Event
"""Checked before every denoising step; when it is set, the stream raises `GenerationCancelled`."""
Prompt = str | Sequence[int]
"""Text (tokenized with the engine's tokenizer, special tokens added) or token ids."""


class Session(Protocol):
    """A KV cache that outlives one generation; what an `Engine.new_session` returns."""

    @property
    def token_ids(self) -> list[int]:
        """The tokens the cache holds; a prompt that starts with them prefills only the rest."""
        ...


class Engine(Protocol):
    """One model replica at batch size 1: text helpers, settings and a streaming generation."""

    @property
    def model_name(self) -> str:
        """The served model's name, as jobs name it."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's Hugging Face tokenizer (agent pins tokenize text without special tokens)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens (the prompt of a plain generation)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens kept (tool calls are made of them)."""
        ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of `messages` (and `tools`) rendered for the model's turn.

        Raises:
            InvalidRequest: the checkpoint has no chat template.
        """
        ...

    def resolve(self, settings: DenoiseSettings | None = None) -> DenoiseSettings:
        """The settings a generation will use: the request's over the engine's defaults."""
        ...

    def new_session(self) -> Session:
        """A fresh KV cache for a conversation whose prompts extend each other."""
        ...

    def stream(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: Any = None,
        template: Sequence[int | None] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yields a `DraftEvent` per denoising step, a `CanvasEvent` per committed canvas, then `EndEvent`.

        Closing the iterator early stops the generation between two steps.

        Args:
            prompt: text or token ids.
            settings: overrides of the engine's defaults.
            cancel: checked before every step.
            session: a `Session` from this engine's `new_session`, reused when the prompt extends it.
            template: pinned tokens: new token i is fixed to `template[i]` unless that is None.

        Raises:
            InvalidRequest: a prompt that does not fit, a bad template.
            GenerationCancelled: `cancel` was set.
            EngineBroken: the engine cannot go on (CUDA error, out of memory).
        """
        ...

    def generate(
        self,
        prompt: Prompt,
        settings: DenoiseSettings | None = None,
        *,
        cancel: CancelSignal | None = None,
        session: Any = None,
        template: Sequence[int | None] | None = None,
    ) -> GenerationResult:
        """`stream` to its end; returns the `EndEvent`'s result."""
        ...


if TYPE_CHECKING:

    def _diffusion_engine_is_an_engine(engine: DiffusionEngine) -> Engine:
        return engine
