"""The engine-backed agent model on a random-weight tiny checkpoint of the real class.

Random weights never call a tool on their own, so the tests pin a whole call with the engine's
`template=` argument: that exercises parsing, the early stop and the KV reuse on the real engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blockpress.agents import AgentLoop, AgentTask, builtin_tools
from blockpress.agents.model import Message
from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.agent_model import EngineModel, pin_tool_call_skeleton

CALL = '<|tool_call>call:calculator{expression:<|"|>37*41+12<|"|>}<tool_call|>'
SETTINGS = DenoiseSettings(seed=5, max_new_tokens=256, max_denoising_steps=4)


def _pin_call_on_first_turn(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]) -> str | None:
    return None if any(m["role"] == "tool" for m in messages) else CALL


def test_a_pinned_call_runs_stops_generation_early_and_the_next_turn_reuses_the_cache(
    engine: DiffusionEngine,
) -> None:
    canvases: list[Any] = []
    model = EngineModel(engine, SETTINGS, pin=_pin_call_on_first_turn, on_canvas=canvases.append)
    task = AgentTask.from_instructions("What is 37*41+12?", tools=("calculator",), max_turns=2)
    result = AgentLoop(model, builtin_tools()).run(task)
    first = result.turns[0]
    assert first.call == {"name": "calculator", "arguments": {"expression": "37*41+12"}}
    assert first.result == {"result": 1529}
    # The call fits in the first few canvases; the loop closed the turn there instead of 256 tokens.
    needed = -(-len(engine.tokenizer(CALL, add_special_tokens=False)["input_ids"]) // engine.canvas_length)
    assert model.stats[0].canvases == needed < 256 // engine.canvas_length
    # Turn 2's prompt starts with turn 1's prompt and every canvas but the last: only the rest is encoded.
    turn0, turn1 = model.stats[0], model.stats[1]
    assert turn0.reused_tokens == 0
    assert turn1.reused_tokens == turn0.prompt_tokens + (needed - 1) * engine.canvas_length
    assert turn1.prompt_tokens > turn1.reused_tokens
    assert canvases and all(c.text is not None for c in canvases)


def test_the_task_budget_caps_a_turns_new_tokens(engine: DiffusionEngine) -> None:
    model = EngineModel(engine, DenoiseSettings(seed=1, max_new_tokens=256, stop_token_ids=()))
    chunks = list(model.stream_turn([{"role": "user", "content": "hi"}], [], max_new_tokens=40))
    assert sum(c.tokens for c in chunks) == 40
    assert len(chunks) == -(-40 // engine.canvas_length)


def test_the_skeleton_pins_the_call_prefix_on_the_first_turn_only(engine: DiffusionEngine) -> None:
    tools = [t.declaration() for t in builtin_tools().select(["calculator"])]
    first = [{"role": "user", "content": "37*41+12?"}]
    assert pin_tool_call_skeleton(first, tools) == "<|tool_call>call:calculator{"
    later = [*first, {"role": "tool", "name": "calculator", "content": {"result": 1529}}]
    assert pin_tool_call_skeleton(later, tools) is None
    model = EngineModel(engine, SETTINGS, pin=pin_tool_call_skeleton)
    text = "".join(c.text for c in model.stream_turn(first, tools))
    assert text.startswith("<|tool_call>call:calculator{")
    skeleton = engine.tokenizer("<|tool_call>call:calculator{", add_special_tokens=False)["input_ids"]
    assert model.stats[0].pinned_tokens == len(skeleton)
