"""What the engine hands back: per-step drafts, committed canvases and the final result."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CanvasEvent",
    "CanvasStats",
    "DraftEvent",
    "EndEvent",
    "GenerationResult",
    "PrefillStats",
    "StreamEvent",
    "Timings",
    "result_of",
]

StopReason = Literal["stop_token", "max_new_tokens"]


@dataclass(frozen=True, slots=True)
class CanvasStats:
    """How one canvas converged."""

    index: int
    steps: int
    """Denoising steps this canvas took."""
    max_steps: int
    """The step limit it ran under."""
    tokens_committed: int
    """New tokens this canvas contributed (cut at a stop token or the token limit)."""
    mean_entropy: float
    """Mean per-position entropy of the last step's temperature-scaled distribution."""
    accepted_per_step: list[int] = field(default_factory=list)
    """Positions accepted at each step (the entropy-bound sampler's choice)."""
    step_s: list[float] = field(default_factory=list)
    """Wall time of each step, seconds."""


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent in each stage of one generation."""

    prefill_s: float = 0.0
    """Encoding the uncached prompt tokens into the KV cache."""
    first_canvas_s: float = 0.0
    """From the start of the call to the first committed canvas."""
    denoise_s: float = 0.0
    """Sum of all denoising steps."""
    total_s: float = 0.0


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The outcome of one generation."""

    token_ids: list[int]
    """New tokens, cut before the first stop token and at `max_new_tokens`."""
    text: str
    """`token_ids` decoded, special tokens kept (tool calls are made of them)."""
    stop_reason: StopReason
    prompt_tokens: int
    prefilled_tokens: int
    """Prompt tokens that actually ran through the encoder; fewer than `prompt_tokens` on a session hit."""
    canvases: list[CanvasStats]
    timings: Timings
    seed: int
    """The seed that was used; pass it back to reproduce this output."""

    @property
    def steps_per_canvas(self) -> float:
        return sum(c.steps for c in self.canvases) / max(1, len(self.canvases))

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per decoder forward pass, the usual diffusion-LM efficiency figure."""
        return len(self.token_ids) / max(1, sum(c.steps for c in self.canvases))


@dataclass(frozen=True, slots=True)
class PrefillStats:
    """The prompt prefill of one generation, as the engine measured it."""

    prompt_tokens: int
    prefilled_tokens: int
    """Tokens the encoder actually ran (fewer than the prompt on a warm session)."""
    seconds: float


@dataclass(frozen=True, slots=True)
class DraftEvent:
    """The argmax canvas after one denoising step."""

    canvas_index: int
    step: int
    token_ids: list[int]
    accepted: int
    mean_entropy: float
    step_s: float
    decoder_s: float | None = None
    """The decoder forward's part of `step_s` (embedding to output head); the rest is the sampler's.
    None where the engine cannot split the step."""
    commit_s: float = 0.0
    """Just before this step: encoding the previous canvas into the KV cache (a canvas's first step)."""
    prefill: PrefillStats | None = None
    """On a generation's first step only: the prefill that preceded it, so a consumer that stops early
    (a complete tool call) still knows it."""


@dataclass(frozen=True, slots=True)
class CanvasEvent:
    """A canvas committed into the KV cache."""

    canvas_index: int
    token_ids: list[int]
    text: str
    stats: CanvasStats
    last: bool = False
    """No canvas follows (the stop token or `max_new_tokens` was reached): the runner writes this one
    together with the job's final event, one Redis call instead of two at the end of every job."""


@dataclass(frozen=True, slots=True)
class EndEvent:
    result: GenerationResult


StreamEvent = DraftEvent | CanvasEvent | EndEvent


def result_of(
    events: Iterable[StreamEvent],
    on_event: Callable[[DraftEvent | CanvasEvent], GenerationResult | None] | None = None,
) -> GenerationResult:
    """Consumes an engine stream up to its `EndEvent` and returns that event's result.

    Args:
        events: an engine's `stream(...)`; closed on the way out, which stops an engine that is not
            done yet between two steps.
        on_event: sees every draft and canvas; returning a result ends the generation there, with
            that result (a caller that has what it needs, such as a complete tool call).

    Raises:
        RuntimeError: the stream ended without an `EndEvent` (an engine bug).
    """
    try:
        for event in events:
            if isinstance(event, EndEvent):
                return event.result
            if on_event is not None and (early := on_event(event)) is not None:
                return early
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    raise RuntimeError("the engine's stream ended without an EndEvent")
