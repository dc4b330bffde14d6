"""How one job ended, as the runner writes it, counts it and puts it on its span."""

from __future__ import annotations

from typing import Any, NamedTuple

from blockpress.runtime.contracts.jobs import JobState
from blockpress.workers.errors import EngineBroken
from blockpress.workers.types import GenerationResult

__all__ = ["NOT_OURS", "Ending", "is_broken"]


class Ending(NamedTuple):
    """The final state to write (None: not ours to write), its payload, the engine's result when
    the job was a generation (for metrics), and the events to write with the final one."""

    state: JobState | None
    result: dict[str, Any] | None
    error: dict[str, str] | None
    generation: GenerationResult | None = None
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    """(type, data) of the run's events still to write, written just before the final one."""


NOT_OURS = Ending(None, None, None)
"""A newer attempt owns the job (or its lease will hand it to one): write nothing."""


def is_broken(exc: BaseException) -> bool:
    """The engine cannot go on: the replica must exit so that Ray starts a fresh one."""
    if isinstance(exc, EngineBroken):
        return True
    # Raised past the engine's own translation (from a wrapper, or torch outside `stream`).
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "CUDA" in str(exc))
