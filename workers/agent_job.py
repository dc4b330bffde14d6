"""One agent job, as the replica's runner calls it for `kind == "agent"`.

The runner owns the queue (async); this function owns the loop (sync, on the engine's thread).
They meet in three callables: `emit(payload)` appends a job event (a typed payload of
`blockpress.runtime.contracts.events`), `cancel()` says whether the
client cancelled, and the `Ledger` keeps turn records where a redelivery of the job finds them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from blockpress.agents.builtins import builtin_tools
from blockpress.agents.errors import InvalidAgentTask
from blockpress.agents.events import AgentEvent, ToolCalled, ToolReturned, TurnStarted
from blockpress.agents.ledger import InMemoryLedger, Ledger
from blockpress.agents.loop import AgentLoop
from blockpress.agents.model import AgentModel
from blockpress.agents.task import AgentTask
from blockpress.agents.tools import ToolRegistry
from blockpress.runtime.contracts.events import (
    Canvas,
    Completed,
    Payload,
    Timings,
    ToolCallEvent,
    ToolResult,
    Turn,
    Usage,
)
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.workers.agent_model import EngineModel, TemplatePolicy, TurnStats
from blockpress.workers.errors import InvalidRequest
from blockpress.workers.protocol import CancelSignal, Engine
from blockpress.workers.types import CanvasEvent

__all__ = ["DEFAULT_MAX_TURNS", "default_registry", "run_agent_job", "task_from_job"]

DEFAULT_MAX_TURNS = 8
Emit = Callable[[Payload], None]


@cache
def default_registry() -> ToolRegistry:
    """The built-ins (without `http_get`, which needs an operator's allow-list) and the entry points.

    Loaded once per process, so a replica pays for its plugins' imports once, at its first job.
    """
    registry = builtin_tools()
    registry.load_entry_points()
    return registry


def task_from_job(spec: Any, *, default_max_turns: int = DEFAULT_MAX_TURNS) -> AgentTask:
    """The `AgentTask` of a `JobSpec` (its `agent` fields and `messages`).

    Raises:
        InvalidAgentTask: no task text and no messages, or a bad limit.
    """
    agent: Mapping[str, Any] = spec.agent or {}
    messages = list(spec.messages or [])
    if agent.get("task"):
        messages.append({"role": "user", "content": agent["task"]})
    if not messages:
        raise InvalidAgentTask("agent.task", "is empty; send a task or at least one message")
    return AgentTask(
        messages=tuple(messages),
        tools=tuple(agent.get("tools") or ()),
        max_turns=agent.get("max_turns") or default_max_turns,
        max_new_tokens=agent.get("max_new_tokens") or None,
        max_seconds=agent.get("max_seconds") or None,
    )


def run_agent_job(
    engine: Engine,
    spec: Any,
    *,
    emit: Emit,
    cancel: CancelSignal | None = None,
    registry: ToolRegistry | None = None,
    ledger: Ledger | None = None,
    pin: TemplatePolicy | None = None,
    model: AgentModel | None = None,
    default_max_turns: int = DEFAULT_MAX_TURNS,
) -> dict[str, Any]:
    """Runs the agent task of `spec` (a `JobSpec`) on `engine`; returns the `completed` payload.

    Emits `turn`, `canvas`, `tool_call` and `tool_result` events as they happen. The payload's
    `stop_reason` is "final_answer", or "max_turns" / "max_new_tokens" / "max_seconds" when a
    limit ended the task (its `text` is then the last text the model wrote); `turns` holds every
    turn record with whole tool results, kept in the job record for operators (the gRPC `Completed`
    message has no field for them).

    Args:
        engine: the replica's engine; the task's turns run on it through an `EngineModel`.
        registry: the replica's tools; default: the built-ins and the `blockpress.tools` entry points.
        ledger: the job's turn records; pass a `blockpress.workers.ledger.RedisLedger` for this
            attempt so that a redelivery resumes. Default: in memory (a redelivery starts over).
        pin: chooses text to pin at the start of a turn (see `agent_model.pin_tool_call_skeleton`).
        model: the model the loop talks to instead of one over `engine` (a scripted model in tests,
            a remote model); `settings`, `cancel` and `pin` are then its own business.

    Raises:
        blockpress.workers.errors.InvalidRequest: the task is empty, has a bad limit or names a
            tool the registry lacks (the runner answers INVALID_ARGUMENT).
        blockpress.workers.errors.EngineError: from the engine (cancelled, broken, prompt too long).
        Superseded: a newer attempt owns the job; nothing more was run or written.
    """
    try:
        task = task_from_job(spec, default_max_turns=default_max_turns)
        registry = registry if registry is not None else default_registry()
        registry.select(task.tools)
    except InvalidAgentTask as exc:
        raise InvalidRequest(str(exc)) from exc
    started = time.perf_counter()
    canvas_index = 0

    def on_canvas(event: CanvasEvent) -> None:
        nonlocal canvas_index
        emit(Canvas(index=canvas_index, text=event.text, steps=event.stats.steps, tokens=len(event.token_ids)))
        canvas_index += 1

    if model is None:
        settings = DenoiseSettings.from_mapping(spec.settings or {})
        model = EngineModel(engine, settings, cancel=cancel, pin=pin, on_canvas=on_canvas)
    loop = AgentLoop(
        model,
        registry,
        ledger=InMemoryLedger() if ledger is None else ledger,
        on_event=lambda e: _forward(e, spec.job_id, emit),
        cancelled=cancel.is_set if isinstance(cancel, threading.Event) else cancel,
    )
    result = loop.run(task)
    stats: list[TurnStats] = getattr(model, "stats", [])
    return Completed(
        text=result.text,
        stop_reason=result.stop_reason,
        canvases=sum(s.canvases for s in stats),
        usage=Usage(
            prompt_tokens=sum(s.prompt_tokens for s in stats),
            completion_tokens=result.tokens,
            prefilled_tokens=sum(s.prompt_tokens - s.reused_tokens for s in stats),
        ),
        timings=Timings(
            first_canvas_s=stats[0].first_canvas_s if stats else 0.0, total_s=time.perf_counter() - started
        ),
        turns=tuple(t.to_mapping() for t in result.turns),
    )


def _forward(event: AgentEvent, job_id: str, emit: Emit) -> None:
    call_id = f"{job_id}:{event.turn}"
    if isinstance(event, TurnStarted):
        emit(Turn(index=event.turn, text=""))
    elif isinstance(event, ToolCalled):
        arguments = json.dumps(event.arguments, ensure_ascii=False)
        emit(ToolCallEvent(turn=event.turn, call_id=call_id, name=event.name, arguments_json=arguments))
    elif isinstance(event, ToolReturned):
        emit(ToolResult(turn=event.turn, call_id=call_id, name=event.name, content=event.content,
                        is_error=not event.ok))  # fmt: skip
    # The final answer and early stops travel in the `completed` payload the runner writes.
