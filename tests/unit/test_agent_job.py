"""`run_agent_job`, as the replica's runner calls it, on a random-weight tiny checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from blockpress.agents import InMemoryLedger
from blockpress.agents.model import Message
from blockpress.runtime.contracts.events import Completed, to_data
from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.workers import DiffusionEngine, InvalidRequest
from blockpress.workers.agent_job import run_agent_job

CALL = '<|tool_call>call:calculator{expression:<|"|>6*7<|"|>}<tool_call|>'


def _pin_call_first(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]) -> str | None:
    return None if any(m["role"] == "tool" for m in messages) else CALL


def _spec(**agent: Any) -> JobSpec:
    return JobSpec(
        job_id="job-7",
        model="tiny",
        kind="agent",
        settings={"seed": 3, "max_new_tokens": 96, "max_denoising_steps": 3},
        agent={"task": "What is 6*7?", "tools": ["calculator"], **agent},
    )


def test_an_agent_job_emits_its_events_and_returns_the_completed_payload(engine: DiffusionEngine) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    ledger = InMemoryLedger()
    completed = run_agent_job(
        engine,
        _spec(max_turns=2),
        emit=lambda payload: events.append(to_data(payload)),
        ledger=ledger,
        pin=_pin_call_first,
    )
    assert isinstance(completed, Completed)
    _, payload = to_data(completed)
    kinds = [k for k, _ in events]
    assert kinds[0] == "turn" and "canvas" in kinds
    call = next(d for k, d in events if k == "tool_call")
    assert call == {
        "turn": 0,
        "call_id": "job-7:0",
        "name": "calculator",
        "arguments_json": '{"expression": "6*7"}',
    }
    result = next(d for k, d in events if k == "tool_result")
    assert result["is_error"] is False and json.loads(result["content"]) == {"result": 42}
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("turn", 1)
    assert payload["turns"][0]["result"] == {"result": 42}
    assert payload["stop_reason"] in ("final_answer", "max_turns")  # turn 2 is random weights' own
    # Turn 2 reused turn 1's cache: the encoder ran fewer tokens than the prompts held.
    assert 0 < payload["usage"]["prefilled_tokens"] < payload["usage"]["prompt_tokens"]
    assert payload["canvases"] == sum(1 for k in kinds if k == "canvas")
    assert ledger.get(0) is not None and ledger.get(0)["status"] == "done"


@pytest.mark.parametrize(
    "agent, field",
    [({"tools": ["teleport"]}, "tools"), ({"max_turns": -1}, "max_turns"), ({"task": ""}, "agent.task")],
)
def test_bad_agent_tasks_are_invalid_requests(engine: DiffusionEngine, agent: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        run_agent_job(engine, _spec(**agent), emit=lambda payload: None)
