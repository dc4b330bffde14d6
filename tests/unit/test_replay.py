"""`ReplayFilter` on the event stream of jobs delivered twice: each canvas, turn and tool event reaches
the client once, whatever a superseded attempt already sent."""

from __future__ import annotations

from typing import Any

from blockpress.runtime.contracts.jobs import Event, EventType
from blockpress.runtime.sdk.replay import ReplayFilter


def _events(*spec: tuple[str, dict[str, Any]]) -> list[Event]:
    return [Event(id=f"{i}-0", type=kind, data=data, ts=0.0) for i, (kind, data) in enumerate(spec)]


def _kept(events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
    replays = ReplayFilter()
    return [(e.type, e.data) for e in events if replays.keep(e)]


def _turn(index: int) -> tuple[str, dict[str, Any]]:
    return EventType.TURN, {"index": index}


def _canvas(text: str) -> tuple[str, dict[str, Any]]:
    return EventType.CANVAS, {"text": text}


STARTED = (EventType.STARTED, {})


def test_an_agent_job_resumed_from_its_ledger_shows_each_turn_once() -> None:
    # Attempt 1 finishes turn 0 (its tool ran, so the ledger holds it) and dies in turn 1 after one
    # canvas. Attempt 2 resumes from the ledger: it sends turn 0's events again, then runs turn 1 again
    # from its first canvas (canvas indexes restart at 0 in each attempt), then a new turn 2.
    attempt_1 = [
        STARTED,
        _turn(0),
        _canvas("t0c0"),
        _canvas("t0c1"),
        (EventType.TOOL_CALL, {"turn": 0, "name": "calculator"}),
        (EventType.TOOL_RESULT, {"turn": 0, "content": "1529"}),
        _turn(1),
        (EventType.DRAFT, {"text": "t1c0 draft"}),
        _canvas("t1c0"),
    ]
    attempt_2 = [
        STARTED,
        _turn(0),
        _canvas("t0c0"),
        _canvas("t0c1"),
        (EventType.TOOL_CALL, {"turn": 0, "name": "calculator"}),
        (EventType.TOOL_RESULT, {"turn": 0, "content": "1529"}),
        _turn(1),
        (EventType.DRAFT, {"text": "t1c0 draft again"}),
        _canvas("t1c0"),
        (EventType.DRAFT, {"text": "t1c1 draft"}),
        _canvas("t1c1"),
        _turn(2),
        _canvas("t2c0"),
        (EventType.COMPLETED, {"text": "1529"}),
    ]
    kept = _kept(_events(*attempt_1, *attempt_2))
    assert kept == [
        *attempt_1,
        STARTED,  # every attempt's start passes: the client learns a re-run began
        (EventType.DRAFT, {"text": "t1c1 draft"}),
        _canvas("t1c1"),
        _turn(2),
        _canvas("t2c0"),
        (EventType.COMPLETED, {"text": "1529"}),
    ]
    texts = [data["text"] for kind, data in kept if kind == EventType.CANVAS]
    assert texts == ["t0c0", "t0c1", "t1c0", "t1c1", "t2c0"]


def test_a_resumed_attempt_that_starts_at_the_interrupted_turn_drops_only_its_shown_canvases() -> None:
    # The ledger may hold the finished turns alone, so attempt 2 begins at turn 1 without resending turn 0.
    first = [STARTED, _turn(0), _canvas("t0c0"), _turn(1), _canvas("t1c0"), _canvas("t1c1")]
    second = [STARTED, _turn(1), _canvas("t1c0"), _canvas("t1c1"), _canvas("t1c2"), _turn(2), _canvas("t2c0")]
    assert _kept(_events(*first, *second)) == [*first, STARTED, _canvas("t1c2"), _turn(2), _canvas("t2c0")]


def test_a_generation_re_run_from_canvas_zero_shows_only_new_canvases() -> None:
    first = [STARTED, _canvas("c0"), _canvas("c1")]
    second = [STARTED, _canvas("c0"), _canvas("c1"), _canvas("c2"), (EventType.COMPLETED, {"text": "c0c1c2"})]
    assert _kept(_events(*first, *second)) == [
        *first,
        STARTED,
        _canvas("c2"),
        (EventType.COMPLETED, {"text": "c0c1c2"}),
    ]


def test_a_single_attempt_passes_unchanged() -> None:
    # A turn makes at most one tool call (agents/loop.py), so one tool event of each kind per turn.
    events = [
        STARTED,
        _turn(0),
        _canvas("a"),
        (EventType.TOOL_CALL, {"turn": 0, "name": "calculator"}),
        (EventType.TOOL_RESULT, {"turn": 0, "content": "2"}),
        _turn(1),
        _canvas("a"),  # the same text in another turn is another canvas
        (EventType.COMPLETED, {}),
    ]
    assert _kept(_events(*events)) == events
