"""Held-out accuracy of a calculator checkpoint, run through the real engine as an agent would.

Each problem is played out turn by turn: the engine answers the conversation so far; a tool call is
parsed strictly, evaluated, and its result appended as a tool message; a turn without a tool call is
the final answer. The answer is exact when its last number equals the problem's answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from blockpress.workers.tinytrain.data import (
    CALCULATOR_TOOL,
    Problem,
    conversation_steps,
    tool_call_message,
    tool_result_message,
)

__all__ = ["Outcome", "Report", "evaluate", "last_number", "parse_call", "solve", "turn_accuracy"]

_CALL = re.compile(r'<\|tool_call>call:calculator\{expression:<\|"\|>([0-9+\-*]+)<\|"\|>\}<tool_call\|>')
_NUMBER = re.compile(r"-?\d+")
_MAX_TURNS = 4


def parse_call(text: str) -> str | None:
    """The expression of a well-formed calculator call that is the whole turn, else None."""
    match = _CALL.fullmatch(text.strip())
    return match.group(1) if match else None


def last_number(text: str) -> int | None:
    """The last integer in `text` (the answer sentences end with it)."""
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def _calculate(expression: str) -> int | None:
    # Same grammar as the training data: digits and + - * only; anything else is a failed tool call.
    if not re.fullmatch(r"-?\d+([+\-*]-?\d+)*", expression):
        return None
    # A model may write "08"; a calculator reads it as 8 (Python's parser would refuse it).
    normalised = re.sub(r"\b0+(\d)", r"\1", expression)
    return int(eval(normalised, {"__builtins__": {}}, {}))


@dataclass
class Outcome:
    """How one problem went."""

    problem: Problem
    answer_text: str | None = None
    correct: bool = False
    calls: int = 0
    """Turns that tried a tool call (contained `<|tool_call>`)."""
    well_formed_calls: int = 0
    right_calls: int = 0
    """Well-formed calls whose expression is the one the problem needs at that point."""
    steps: list[int] = field(default_factory=list)
    """Denoising steps of every canvas of every turn."""
    tokens: int = 0
    turns: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Aggregate figures over a list of problems."""

    outcomes: list[Outcome]
    max_steps: int

    @property
    def accuracy(self) -> float:
        return sum(o.correct for o in self.outcomes) / len(self.outcomes)

    @property
    def call_validity(self) -> float:
        calls = sum(o.calls for o in self.outcomes)
        return sum(o.well_formed_calls for o in self.outcomes) / calls if calls else 0.0

    @property
    def right_call_rate(self) -> float:
        calls = sum(o.calls for o in self.outcomes)
        return sum(o.right_calls for o in self.outcomes) / calls if calls else 0.0

    @property
    def mean_steps_per_canvas(self) -> float:
        steps = [s for o in self.outcomes for s in o.steps]
        return sum(steps) / len(steps)

    @property
    def tokens_per_forward(self) -> float:
        return sum(o.tokens for o in self.outcomes) / sum(sum(o.steps) for o in self.outcomes)

    def summary(self) -> str:
        n = len(self.outcomes)
        canvases = sum(len(o.steps) for o in self.outcomes)
        return (
            f"problems {n}: exact answers {self.accuracy:.1%}, well-formed tool calls {self.call_validity:.1%}"
            f" (right expression {self.right_call_rate:.1%}), mean steps per canvas "
            f"{self.mean_steps_per_canvas:.2f} of {self.max_steps} over {canvases} canvases, "
            f"tokens per forward {self.tokens_per_forward:.2f}"
        )


def solve(engine: Any, problem: Problem, *, seed: int, tools: list[dict[str, Any]] | None = None) -> Outcome:
    """Plays `problem` out through `engine` (a `blockpress.workers.DiffusionEngine`)."""
    from blockpress.workers import DenoiseSettings

    tools = tools if tools is not None else [CALCULATOR_TOOL]
    outcome = Outcome(problem)
    messages: list[dict[str, Any]] = [{"role": "user", "content": problem.question}]
    expected = [problem.expression] + ([problem.second_expression] if problem.second_expression else [])
    session = engine.new_session()
    for turn in range(_MAX_TURNS):
        prompt = engine.apply_chat_template(messages, tools=tools)
        result = engine.generate(prompt, DenoiseSettings(seed=seed + turn), session=session)
        outcome.steps += [c.steps for c in result.canvases]
        outcome.tokens += len(result.token_ids)
        text = result.text
        outcome.turns.append(text)
        if "<|tool_call>" not in text:
            outcome.answer_text = text
            outcome.correct = last_number(text) == problem.answer
            return outcome
        expression = parse_call(text)
        outcome.calls += 1
        if expression is None:
            return outcome
        outcome.well_formed_calls += 1
        outcome.right_calls += outcome.calls <= len(expected) and expression == expected[outcome.calls - 1]
        value = _calculate(expression)
        if value is None:
            return outcome
        messages += [tool_call_message(expression), tool_result_message(value)]
    return outcome


def evaluate(engine: Any, problems: list[Problem], *, seed: int = 0) -> Report:
    """Solves every problem (each with its own seeds) and aggregates the figures."""
    outcomes = [solve(engine, p, seed=seed + 1000 * i) for i, p in enumerate(problems)]
    return Report(outcomes, engine.resolve(None).max_denoising_steps)


def turn_accuracy(engine: Any, problems: list[Problem], *, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Right turns per kind of turn, each given a correct conversation so far: (right, asked) for
    "first call", "second call" (two-step problems) and "answer".

    Played-out accuracy multiplies the turns' errors; this says which turn makes them.
    """
    from blockpress.workers import DenoiseSettings

    counts: dict[str, list[int]] = {"first call": [0, 0], "second call": [0, 0], "answer": [0, 0]}
    for i, problem in enumerate(problems):
        *calls, answer = conversation_steps(problem)
        for j, sample in enumerate([*calls, answer]):
            prompt = engine.apply_chat_template(sample.messages, tools=[CALCULATOR_TOOL])
            text = engine.generate(prompt, DenoiseSettings(seed=seed + 1000 * i + j)).text
            if sample is answer:
                kind, right = "answer", last_number(text) == problem.answer
            else:
                kind, right = ("first call", "second call")[j], parse_call(text) == parse_call(sample.target)
            counts[kind][0] += right
            counts[kind][1] += 1
    return {kind: (right, asked) for kind, (right, asked) in counts.items()}
