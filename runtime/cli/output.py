"""What the CLI prints for a job's events: one line per event, the model's text as it comes."""

from __future__ import annotations

import sys
from typing import Any

from blockpress.runtime.contracts.jobs import Event, EventType

__all__ = ["print_agent_events", "print_events"]


def print_events(events: Any, *, drafts: bool, out: Any = sys.stdout, err: Any = sys.stderr) -> Event | None:
    """Writes committed canvases to `out` as they come (drafts to `err`); returns the final event."""
    final = None
    for event in events:
        if event.type == EventType.CANVAS:
            if drafts:
                err.write("\r\033[K")
            out.write(event.data.get("text", ""))
            out.flush()
        elif event.type == EventType.DRAFT and drafts:
            text = event.data.get("text", "").replace("\n", " ")
            err.write(
                f"\r\033[K[canvas {event.data.get('canvas_index', 0)} step {event.data.get('step', 0)}] {text[-60:]}"
            )
            err.flush()
        elif event.type == EventType.STARTED:
            err.write(f"[started on {event.data.get('replica', '?')}, attempt {event.data.get('attempt', 1)}]\n")
        if event.is_final:
            final = event
    out.write("\n")
    return final


def print_agent_events(
    events: Any, *, out: Any = sys.stdout, err: Any = sys.stderr, answer: bool = True
) -> list[Event]:
    """Writes an agent task's progress to `err` as it comes (turns, the model's text, tool calls and
    results) and, with `answer`, its final answer to `out`, so the answer alone can be piped; returns
    every event."""
    seen: list[Event] = []
    midline = False
    for event in events:
        seen.append(event)
        d = event.data
        if event.type == EventType.CANVAS:
            err.write(d.get("text", ""))
            midline = True
            err.flush()
            continue
        if midline:
            err.write("\n")
            midline = False
        if event.type == EventType.STARTED:
            err.write(f"[started on {d.get('replica', '?')}, attempt {d.get('attempt', 1)}]\n")
        elif event.type == EventType.TURN:
            err.write(f"[turn {d.get('index', 0)}]\n")
        elif event.type == EventType.TOOL_CALL:
            err.write(f"-> {d.get('name', '?')} {d.get('arguments_json', '{}')}\n")
        elif event.type == EventType.TOOL_RESULT:
            mark = "error" if d.get("is_error") else "result"
            err.write(f"<- {d.get('name', '?')} {mark}: {d.get('content', '')}\n")
        elif event.type == EventType.COMPLETED and answer:
            out.write(d.get("text", "") + "\n")
            out.flush()
        err.flush()
    return seen
