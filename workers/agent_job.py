"""One agent job, as the replica's runner calls it for `kind == "agent"`.

The runner owns the queue (async); this function owns the loop (sync, on the engine's thread).
They meet in three callables: `emit(type, data)` appends a job event, `cancel()` says whether the
client cancelled, and the `Ledger` keeps turn records where a redelivery of the job finds them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

from blockpress.agents.builtins import builtin_tools
from blockpress.agents.errors import InvalidAgentTask
from blockpress.agents.events import AgentEvent, ToolCalled, ToolReturned, TurnStarted
from blockpress.agents.ledger import InMemoryLedger, Ledger
from blockpress.agents.loop import AgentLoop
from blockpress.agents.model import AgentModel
from blockpress.agents.task import AgentTask
from blockpress.agents.tools import ToolRegistry
from blockpress.workers.agent_model import EngineModel, TemplatePolicy, TurnStats

if TYPE_CHECKING:
    from blockpress.workers import CanvasEvent, DiffusionEngine

__all__ = ["DEFAULT_MAX_TURNS", "default_registry", "run_agent_job", "task_from_job"]

DEFAULT_MAX_TURNS = 8
Emit = Callable[[str, dict[str, Any]], None]
CancelSignal = Callable[[], bool] | threading.Event


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
    engine: DiffusionEngine | AgentModel,
    spec: Any,
    *,
    emit: Emit,
    cancel: CancelSignal | None = None,
    registry: ToolRegistry | None = None,
    ledger: Ledger | None = None,
    pin: TemplatePolicy | None = None,
    default_max_turns: int = DEFAULT_MAX_TURNS,
) -> dict[str, Any]:
    """Runs the agent task of `spec` (a `JobSpec`) on `engine`; returns the `completed` payload.

    `engine` is the replica's `DiffusionEngine`, or any `AgentModel` (a scripted model in tests, a
    remote model), which is then used as is.

    Emits `turn`, `canvas`, `tool_call` and `tool_result` events as they happen. The payload's
    `stop_reason` is "final_answer", or "max_turns" / "max_new_tokens" / "max_seconds" when a
    limit ended the task (its `text` is then the last text the model wrote); `turns` holds every
    turn record with whole tool results.

    Args:
        registry: the replica's tools; default: the built-ins and the `blockpress.tools` entry points.
        ledger: the job's turn records; pass a `blockpress.workers.ledger.RedisLedger` for this
            attempt so that a redelivery resumes. Default: in memory (a redelivery starts over).

    Raises:
        blockpress.workers.errors.InvalidRequest: the task is empty, has a bad limit or names a
            tool the registry lacks (the runner answers INVALID_ARGUMENT).
        blockpress.workers.errors.EngineError: from the engine (cancelled, broken, prompt too long).
        Superseded: a newer attempt owns the job; nothing more was run or written.
    """
    from blockpress.workers import DenoiseSettings, InvalidRequest

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
        emit("canvas", {"index": canvas_index, "text": event.text, "steps": event.stats.steps,
                        "tokens": len(event.token_ids)})  # fmt: skip
        canvas_index += 1

    if isinstance(engine, AgentModel):
        model: AgentModel = engine
    else:
        settings = DenoiseSettings.from_mapping(spec.settings or {})
        model = EngineModel(engine, settings, cancel=cancel, pin=pin, on_canvas=on_canvas)
    loop = AgentLoop(
        model,
        registry,
        ledger=InMemoryLedger() if ledger is None else ledger,
        on_event=lambda e: _forward(e, spec.job_id, emit),
    )
    result = loop.run(task)
    stats: list[TurnStats] = getattr(model, "stats", [])
    return {
        "text": result.text,
        "token_ids": [],
        "stop_reason": result.stop_reason,
        "canvases": sum(s.canvases for s in stats),
        "usage": {
            "prompt_tokens": sum(s.prompt_tokens for s in stats),
            "completion_tokens": result.tokens,
            "prefilled_tokens": sum(s.prompt_tokens - s.reused_tokens for s in stats),
        },
        "timings": {
            "first_canvas_s": stats[0].first_canvas_s if stats else 0.0,
            "total_s": time.perf_counter() - started,
        },
        "turns": [t.to_mapping() for t in result.turns],
        "error": None if result.error is None else {"reason": result.error.reason, "message": str(result.error)},
    }


def _forward(event: AgentEvent, job_id: str, emit: Emit) -> None:
    call_id = f"{job_id}:{event.turn}"
    if isinstance(event, TurnStarted):
        emit("turn", {"index": event.turn, "text": ""})
    elif isinstance(event, ToolCalled):
        arguments = json.dumps(event.arguments, ensure_ascii=False)
        emit("tool_call", {"turn": event.turn, "call_id": call_id, "name": event.name,
                           "arguments_json": arguments})  # fmt: skip
    elif isinstance(event, ToolReturned):
        emit("tool_result", {"turn": event.turn, "call_id": call_id, "name": event.name,
                             "content": event.content, "is_error": not event.ok})  # fmt: skip
    # The final answer and early stops travel in the `completed` payload the runner writes.
