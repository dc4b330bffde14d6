"""Drops what a re-run attempt of a job sends again, so a client sees each canvas once.

A job whose replica died is delivered again (at-least-once) and its next attempt appends its events
to the same event stream: a generation starts over from canvas 0, an agent task resumes from its
ledger and runs the interrupted turn again, with canvas indexes counted from 0 in each attempt. The
gateway fixes a seed derived from the job id when the client gave none, so the re-run writes the same
canvases; this filter lets through only what the client has not been shown yet.

Events are keyed by their place in the job, not by their index alone: (turn, the canvas's ordinal in
that turn within its attempt) for canvases, the turn for turn, tool-call and tool-result events. A
generation has no turn events, so its canvases are keyed (-1, ordinal). Every `started` event passes:
it tells the client an attempt began (the CLI prints it), and it resets the per-attempt counters.
"""

from __future__ import annotations

from blockpress.runtime.contracts.jobs import Event, EventType

__all__ = ["ReplayFilter"]

_PER_TURN = frozenset({EventType.TOOL_CALL, EventType.TOOL_RESULT})


class ReplayFilter:
    """`keep(event)` is False for an event a superseded attempt of the same job already delivered."""

    def __init__(self) -> None:
        self._seen: set[tuple[object, ...]] = set()
        self._turn = -1
        self._canvases = 0  # canvases of the current turn, in the current attempt

    def keep(self, event: Event) -> bool:
        kind = event.type
        if kind == EventType.STARTED:
            self._turn, self._canvases = -1, 0
            return True
        if kind == EventType.DRAFT:
            # A draft belongs to the canvas being denoised: the next one of this attempt.
            return ("canvas", self._turn, self._canvases) not in self._seen
        if kind == EventType.CANVAS:
            key: tuple[object, ...] = ("canvas", self._turn, self._canvases)
            self._canvases += 1
        elif kind == EventType.TURN:
            self._turn, self._canvases = int(event.data.get("index", 0)), 0
            key = ("turn", self._turn)
        elif kind in _PER_TURN:
            key = (kind, int(event.data.get("turn", 0)))
        else:
            return True
        if key in self._seen:
            return False
        self._seen.add(key)
        return True
