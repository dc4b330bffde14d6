"""Turn records and the ledger that keeps them, so a redelivered task resumes instead of repeating.

A turn is one model turn plus the tool call it made. The loop writes a turn's record twice: as
"calling" just before the tool runs and as "done" after. A replica that dies between the two
leaves a "calling" record; the next attempt does not run that tool again (at most once) and
tells the model its outcome is unknown.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

__all__ = ["InMemoryLedger", "Ledger", "TurnRecord"]


@dataclass(frozen=True)
class TurnRecord:
    """One turn, JSON-friendly. `result` is `{"result": ...}` or `{"error": ...}` once a tool ran."""

    turn: int
    text: str
    """The model's visible text (before any tool call)."""
    tokens: int
    status: Literal["calling", "done"] = "done"
    call: dict[str, Any] | None = None
    """`{"name": ..., "arguments": {...}}` when the turn called a tool."""
    result: dict[str, Any] | None = None
    malformed: str | None = None
    """Why the turn's tool-call text did not parse, when it did not."""
    final: bool = False

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> TurnRecord:
        return cls(**data)

    def done(self, result: dict[str, Any]) -> TurnRecord:
        return replace(self, status="done", result=result)


class Ledger(ABC):
    """Where turn records of one task live; keyed by turn number, starting at 0."""

    @abstractmethod
    def get(self, turn: int) -> dict[str, Any] | None:
        """The record of `turn` as stored by `put`, or None."""

    @abstractmethod
    def put(self, turn: int, record: dict[str, Any]) -> None:
        """Stores (or replaces) the record of `turn` durably before returning."""


class InMemoryLedger(Ledger):
    """A ledger in a dict: for tests and for tasks that need not survive their process."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, Any]] = {}
        self.writes = 0

    def get(self, turn: int) -> dict[str, Any] | None:
        return self.records.get(turn)

    def put(self, turn: int, record: dict[str, Any]) -> None:
        self.records[turn] = dict(record)
        self.writes += 1
