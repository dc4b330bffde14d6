"""Synthetic calculator conversations, and the train / held-out split of arithmetic problems.

Every problem is an expression over small integers that a calculator tool evaluates. The model never
has to do arithmetic: it learns to copy the expression into a tool call, to copy a tool result into the
next expression or into its answer, and where to stop. Problems are split by a hash of the canonical
expression so that held-out problems are operand combinations the trainer never generates.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CALCULATOR_TOOL",
    "TOOL_SETS",
    "TWO_STEP_RATE",
    "Problem",
    "Sample",
    "answer_text",
    "conversation_steps",
    "held_out_problems",
    "is_held_out",
    "random_samples",
    "random_system_prompt",
    "random_tools",
    "render_prefix",
    "sample_problem",
    "tool_call_message",
    "tool_result_message",
]

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with integers, +, - and *.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example 37*41+12"}},
            "required": ["expression"],
        },
    },
}

# The declarations blockpress.agents sends for its built-in tools (copied, so that training does not
# import the agent layer). Training varies the declared tools so that the model keys on the user's
# question, not on one exact system turn.
_AGENT_CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression exactly and returns its value.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "Arithmetic such as 37*41+12 or sqrt(2)**2: numbers, + - * / // % **, "
                    "parentheses, pi, e and abs/round/min/max/sqrt/log/exp/sin/cos/tan/floor/ceil.",
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
_AGENT_PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Runs a Python script in a sandbox without network access and returns what it printed.",
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "A complete Python script; print() the values you need."}
            },
            "required": ["code"],
            "additionalProperties": False,
        },
    },
}
TOOL_SETS: tuple[list[dict[str, Any]], ...] = (
    [CALCULATOR_TOOL],
    [_AGENT_CALCULATOR_TOOL],
    [_AGENT_CALCULATOR_TOOL, _AGENT_PYTHON_TOOL],
)

# The share of two-step problems in the held-out sets (training may ask for more).
TWO_STEP_RATE = 0.4
# One in five operand combinations is held out; the ratio only sets how much of the space tests see.
_HELD_OUT_MODULUS = 5

_SYSTEM_PROMPTS = (
    None,
    "You are a helpful assistant.",
    "You are a careful assistant. Use the calculator for arithmetic.",
    "Answer math questions with the calculator tool.",
)
_QUESTIONS = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "What is {e} equal to?", "{e} = ?")
_FOLLOW_UPS = {
    "+": ("then add {c} to the result", "then add {c}"),
    "-": ("then subtract {c} from the result", "then subtract {c}"),
    "*": ("then multiply the result by {c}", "then multiply it by {c}"),
}
_TWO_STEP_QUESTIONS = ("Compute {e}, {f}.", "What is {e}? Then {g}.", "Calculate {e}, {f}.")


@dataclass(frozen=True)
class Problem:
    """One task: a first expression and, for two-step tasks, an operator and operand applied to its result."""

    expression: str
    question: str
    then_op: str | None = None
    then_operand: int | None = None

    @property
    def first_result(self) -> int:
        return _evaluate(self.expression)

    @property
    def second_expression(self) -> str | None:
        if self.then_op is None:
            return None
        return f"{self.first_result}{self.then_op}{self.then_operand}"

    @property
    def answer(self) -> int:
        """The number a correct final answer contains."""
        second = self.second_expression
        return _evaluate(second) if second is not None else self.first_result

    @property
    def key(self) -> str:
        """The operand combination that decides the split."""
        return f"{self.expression}|{self.then_op}{self.then_operand}"


@dataclass(frozen=True)
class Sample:
    """A conversation prefix (chat messages up to the model's turn) and the model's turn text."""

    messages: list[dict[str, Any]]
    target: str


def _evaluate(expression: str) -> int:
    # The grammar is digits and + - * only (checked here), so Python's own precedence is the calculator's.
    if not expression or any(ch not in "0123456789+-*" for ch in expression):
        raise ValueError(f"not a calculator expression: {expression!r}")
    return int(eval(expression, {"__builtins__": {}}, {}))


def is_held_out(problem: Problem) -> bool:
    """True for the fifth of operand combinations that training never sees."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % _HELD_OUT_MODULUS == 0


def _operand(rng: random.Random) -> int:
    digits = rng.choice((1, 2, 2, 2, 3))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _expression(rng: random.Random) -> str:
    shape = rng.choice(("a*b", "a+b", "a-b", "a*b+c", "a*b-c", "a+b*c", "a+b+c", "a*b*c"))
    if shape == "a*b*c":
        # Keeps results short enough to copy: three small factors.
        return "*".join(str(rng.randint(2, 30)) for _ in range(3))
    values = iter(_operand(rng) for _ in range(3))
    return "".join(str(next(values)) if ch in "abc" else ch for ch in shape)


def _make_problem(rng: random.Random, two_step_rate: float) -> Problem:
    expression = _expression(rng)
    if rng.random() < two_step_rate:
        op = rng.choice(("+", "-", "*"))
        operand = rng.randint(2, 99) if op != "*" else rng.randint(2, 12)
        phrase = rng.choice(_FOLLOW_UPS[op]).format(c=operand)
        template = rng.choice(_TWO_STEP_QUESTIONS)
        question = template.format(e=expression, f=phrase, g=phrase.removeprefix("then "))
        return Problem(expression, question, op, operand)
    return Problem(expression, rng.choice(_QUESTIONS).format(e=expression))


def sample_problem(rng: random.Random, *, held_out: bool = False, two_step_rate: float = TWO_STEP_RATE) -> Problem:
    """A random problem from the training side of the split, or from the held-out side."""
    while True:
        problem = _make_problem(rng, two_step_rate)
        if is_held_out(problem) == held_out:
            return problem


def held_out_problems(count: int, *, seed: int = 1234) -> list[Problem]:
    """A fixed list of problems no training run generates; the same for a given seed and count."""
    rng = random.Random(seed)
    return [sample_problem(rng, held_out=True) for _ in range(count)]


def tool_call_message(expression: str) -> dict[str, Any]:
    """The assistant message that asks the calculator to evaluate `expression`."""
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return {"role": "assistant", "tool_calls": [call]}


def tool_result_message(result: int) -> dict[str, Any]:
    """The calculator's answer as a tool message."""
    return {"role": "tool", "name": "calculator", "content": str(result)}


def answer_text(problem: Problem) -> str:
    """The model's final sentence for `problem`: the last calculation and its result."""
    # Only what the last tool call and its result hold: a two-step answer that also restated the first
    # step (two canvases of copying from far back) was right 12 times in 37 when its calls were.
    expression = problem.second_expression or problem.expression
    return f"{expression} is {problem.answer}."


def conversation_steps(problem: Problem, system: str | None = None) -> list[Sample]:
    """Every model turn of the solved conversation: the tool calls, then the answer.

    Tool-call turns are rendered by the chat template, so their target is the text between
    `<|turn>model\\n` and `<turn|>`; `render_target` produces it.
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": problem.question})
    samples: list[Sample] = []
    expressions = [problem.expression]
    if problem.second_expression is not None:
        expressions.append(problem.second_expression)
    for expression in expressions:
        call = tool_call_message(expression)
        samples.append(Sample(list(messages), _call_text(expression)))
        messages += [call, tool_result_message(_evaluate(expression))]
    samples.append(Sample(list(messages), answer_text(problem)))
    return samples


def random_system_prompt(rng: random.Random) -> str | None:
    """One of the system prompts training varies over (None: no system message)."""
    return rng.choice(_SYSTEM_PROMPTS)


def random_tools(rng: random.Random) -> list[dict[str, Any]]:
    """One of the tool lists training varies over; each declares `calculator`."""
    return rng.choice(TOOL_SETS)


def random_samples(
    rng: random.Random, system: str | None = None, *, two_step_rate: float = TWO_STEP_RATE
) -> list[Sample]:
    """All model turns of one random training conversation."""
    return conversation_steps(sample_problem(rng, two_step_rate=two_step_rate), system)


def _call_text(expression: str) -> str:
    # Must match what the shipped checkpoint's chat_template.jinja renders for `tool_call_message(expression)`.
    return f'<|tool_call>call:calculator{{expression:<|"|>{expression}<|"|>}}<tool_call|>'


def render_prefix(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text the engine would build for `messages`: the chat template plus `<|turn>model\\n`."""
    return str(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False))
