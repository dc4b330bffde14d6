"""The agent loop: a small state machine over model turns and tool calls.

Each pass asks the model for a turn, stops generating as soon as the text holds a complete tool
call, runs the call through the registry (which checks the task's allow-list and the schema) and
feeds the result back, until a turn without a call (the final answer), `max_turns` or a budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, assert_never

from opentelemetry import trace

from blockpress.agents.errors import AgentStopped, BudgetExceeded, MalformedToolCall, MaxTurnsExceeded
from blockpress.agents.events import AgentEvent, FinalAnswer, TaskStopped, ToolCalled, ToolReturned, TurnStarted
from blockpress.agents.isolation import Budget
from blockpress.agents.ledger import InMemoryLedger, Ledger, TurnRecord
from blockpress.agents.model import AgentModel, Message
from blockpress.agents.task import AgentResult, AgentTask
from blockpress.agents.toolcalls import ToolCall, has_complete_call, neutralize, parse_turn
from blockpress.agents.tools import ToolRegistry

__all__ = ["AgentLoop"]

_tracer = trace.get_tracer("blockpress.agents")
_RETRY_HINT = "Your last tool call could not be parsed ({}). Call the tool again in the documented format."


# Next steps of the state machine.
@dataclass(frozen=True)
class _AskModel:
    pass


@dataclass(frozen=True)
class _CallTool:
    record: TurnRecord
    call: ToolCall


@dataclass(frozen=True)
class _Retry:
    record: TurnRecord


@dataclass(frozen=True)
class _Finish:
    record: TurnRecord


@dataclass(frozen=True)
class _Stop:
    error: AgentStopped
    text: str = ""


_Step = _AskModel | _CallTool | _Retry | _Finish | _Stop


@dataclass
class _Run:
    task: AgentTask
    declarations: list[dict[str, Any]]
    deadline: float | None
    messages: list[Message]
    records: list[TurnRecord] = field(default_factory=list)
    tokens: int = 0

    @property
    def turn(self) -> int:
        return len(self.records)


class AgentLoop:
    """Runs tasks against one model and one tool registry.

    Args:
        model: generates the turns.
        registry: the tools; each task selects its own subset.
        ledger: where turn records go; pass the job's ledger to make redelivery resume.
        on_event: called with each `AgentEvent` as it happens.
        clock: monotonic seconds; injectable so tests can run budgets without sleeping.
        stream_text_limit: tool results longer than this are cut in events (never in records).
        cancelled: says whether the task was cancelled; a running tool call is stopped then.
    """

    def __init__(
        self,
        model: AgentModel,
        registry: ToolRegistry,
        *,
        ledger: Ledger | None = None,
        on_event: Callable[[AgentEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream_text_limit: int = 1000,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self._model = model
        self._registry = registry
        self._ledger = ledger if ledger is not None else InMemoryLedger()
        self._emit = on_event or (lambda _event: None)
        self._clock = clock
        self._limit = stream_text_limit
        self._cancelled = cancelled or (lambda: False)

    def run(self, task: AgentTask) -> AgentResult:
        """Runs `task` to its end, resuming after the last turn its ledger holds."""
        tools = self._registry.select(task.tools)
        deadline = None if task.max_seconds is None else self._clock() + task.max_seconds
        run = _Run(task, [t.declaration() for t in tools], deadline, list(task.messages))
        step: _Step = self._resume(run)
        while True:
            if isinstance(step, _AskModel):
                step = self._ask_model(run)
            elif isinstance(step, _CallTool):
                step = self._call_tool(run, step)
            elif isinstance(step, _Retry):
                self._commit(run, step.record)
                step = _AskModel()
            elif isinstance(step, _Finish):
                self._commit(run, step.record)
                self._emit(FinalAnswer(step.record.turn, step.record.text))
                return AgentResult(step.record.text, "final_answer", tuple(run.records), run.tokens)
            elif isinstance(step, _Stop):
                self._emit(TaskStopped(run.turn, step.error.reason, str(step.error)))
                return AgentResult(step.text, step.error.reason, tuple(run.records), run.tokens, step.error)
            else:
                assert_never(step)

    def _resume(self, run: _Run) -> _Step:
        while (stored := self._ledger.get(run.turn)) is not None:
            record = TurnRecord.from_mapping(stored)
            if record.status == "calling":
                # The previous attempt died while this tool ran: never run it twice.
                record = record.done({"error": "interrupted by a replica restart; outcome unknown"})
                self._ledger.put(record.turn, record.to_mapping())
            run.tokens += record.tokens
            if record.final:
                run.records.append(record)
                return _Finish(record)
            self._append(run, record)
        return _AskModel()

    def _ask_model(self, run: _Run) -> _Step:
        task = run.task
        if run.turn >= task.max_turns:
            return _Stop(MaxTurnsExceeded(f"no final answer after {task.max_turns} turns"), self._last_text(run))
        if task.max_new_tokens is not None and run.tokens >= task.max_new_tokens:
            return _Stop(BudgetExceeded("max_new_tokens", f"used all {task.max_new_tokens} new tokens"))
        if self._past_deadline(run):
            return _Stop(BudgetExceeded("max_seconds", f"used all {task.max_seconds} s"), self._last_text(run))
        self._emit(TurnStarted(run.turn))
        remaining = None if task.max_new_tokens is None else task.max_new_tokens - run.tokens
        text, tokens, late = "", 0, False
        chunks = self._model.stream_turn(run.messages, run.declarations, max_new_tokens=remaining)
        with _span("agent.turn", {"blockpress.agent.turn": run.turn}), _closing(chunks):
            for chunk in chunks:
                text, tokens = text + chunk.text, tokens + chunk.tokens
                if has_complete_call(text):
                    break
                if self._past_deadline(run):
                    late = True
                    break
        run.tokens += tokens
        if late:
            return _Stop(BudgetExceeded("max_seconds", f"used all {task.max_seconds} s mid-turn"), text)
        try:
            visible, call = parse_turn(text)
        except MalformedToolCall as exc:
            return _Retry(TurnRecord(run.turn, neutralize(text), tokens, malformed=str(exc)))
        if call is not None:
            record = TurnRecord(run.turn, visible, tokens, status="calling", call=_call_mapping(call))
            return _CallTool(record, call)
        if task.max_new_tokens is not None and run.tokens >= task.max_new_tokens:
            return _Stop(BudgetExceeded("max_new_tokens", f"used all {task.max_new_tokens} new tokens"), visible)
        return _Finish(TurnRecord(run.turn, visible, tokens, final=True))

    def _call_tool(self, run: _Run, step: _CallTool) -> _Step:
        call = step.call
        self._emit(ToolCalled(run.turn, call.name, call.arguments))
        self._ledger.put(run.turn, step.record.to_mapping())
        with _span("agent.tool", {"gen_ai.tool.name": call.name}) as span:
            result = self._registry.invoke(call, run.task.tools, budget=self._budget(run))
            span.set_attribute("blockpress.tool.outcome", "ok" if result.ok else "error")
        record = step.record.done(_neutralized(result.content()))
        self._commit(run, record)
        shown = json.dumps(record.result, ensure_ascii=False, default=str)
        self._emit(ToolReturned(record.turn, call.name, result.ok, shown[: self._limit], len(shown) > self._limit))
        return _AskModel()

    def _budget(self, run: _Run) -> Budget:
        # The tool's clock is the real one: `self._clock` may be a test's, the kill is wall time.
        left = self._registry.limits.wall_seconds if run.deadline is None else run.deadline - self._clock()
        return Budget(time.monotonic() + min(left, self._registry.limits.wall_seconds), self._cancelled)

    def _commit(self, run: _Run, record: TurnRecord) -> None:
        self._ledger.put(record.turn, record.to_mapping())
        if record.final:
            run.records.append(record)
        else:
            self._append(run, record)

    def _append(self, run: _Run, record: TurnRecord) -> None:
        run.records.append(record)
        if record.malformed is not None:
            run.messages.append({"role": "assistant", "content": record.text})
            run.messages.append({"role": "user", "content": _RETRY_HINT.format(record.malformed)})
        elif record.call is not None:
            run.messages.append(
                {
                    "role": "assistant",
                    "content": record.text,
                    "tool_calls": [{"type": "function", "function": record.call}],
                }
            )
            run.messages.append({"role": "tool", "name": record.call["name"], "content": record.result})

    def _past_deadline(self, run: _Run) -> bool:
        return run.deadline is not None and self._clock() >= run.deadline

    @staticmethod
    def _last_text(run: _Run) -> str:
        return run.records[-1].text if run.records else ""


def _call_mapping(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "arguments": call.arguments}


def _neutralized(value: Any) -> Any:
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, Mapping):
        return {neutralize(str(k)): _neutralized(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_neutralized(v) for v in value]
    return value


@contextmanager
def _closing(chunks: Iterator[Any]) -> Iterator[None]:
    # Closing the model's generator is what stops generation once a tool call is complete.
    try:
        yield
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


@contextmanager
def _span(name: str, attributes: Mapping[str, Any]) -> Iterator[trace.Span]:
    with _tracer.start_as_current_span(name, attributes=dict(attributes)) as span:
        yield span
