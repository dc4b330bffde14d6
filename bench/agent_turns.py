"""Agent turns with the conversation's KV cache reused against a full re-prefill, in one run.

    python bench/agent_turns.py                   # CPU: a ~10M-parameter random checkpoint, 4k-token context
    python bench/agent_turns.py --full-size       # GPU: the full DiffusionGemma shape, random bf16
    python bench/agent_turns.py --pinning workers/checkpoints/tiny-calculator   # does pinning help?

The same agent task runs twice through `AgentLoop` and `EngineModel`: once keeping one engine session
(each turn encodes only the tokens added since the last: the tool call's canvas and the tool result),
once with a fresh session per turn (each turn re-encodes the whole conversation). Random weights do
not call tools, so each turn but the last pins a complete calculator call; the calculator really runs
and its result goes into the next turn. Fixed denoising steps make both runs do the same denoising
work, so the difference in time to the first committed canvas is the prefill.

`--pinning CHECKPOINT` answers another question on a trained checkpoint: held-out calculator tasks
run with and without the tool-call skeleton (`<|tool_call>call:calculator{`) pinned on the first
turn, printing accuracy, well-formed first calls, and denoising steps and time of the first turn.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from blockpress.agents import AgentLoop, AgentTask, builtin_tools
from blockpress.agents.model import Message
from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.agent_model import EngineModel, TurnStats
from blockpress.workers.testing import build_tiny_checkpoint

FULL_SIZE: dict[str, Any] = {
    "vocab_size": 262_144, "hidden_size": 2816, "num_layers": 30, "num_experts": 128, "top_k_experts": 8,
    "canvas_length": 256, "context_length": 262_144, "sliding_window": 1024,
}  # fmt: skip
CPU: dict[str, Any] = {
    "vocab_size": 8192, "hidden_size": 256, "num_layers": 4, "num_experts": 8, "canvas_length": 256,
    "context_length": 32_768, "sliding_window": 1024,
}  # fmt: skip


def _pin_calls(turns: int) -> Any:
    def pin(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]) -> str | None:
        done = sum(1 for m in messages if m.get("role") == "tool")
        if done >= turns - 1:
            return None  # the last turn is the model's own
        return f'<|tool_call>call:calculator{{expression:<|"|>{done + 2}*{done + 3}<|"|>}}<tool_call|>'

    return pin


def _run(engine: DiffusionEngine, task: AgentTask, settings: DenoiseSettings, *, reuse: bool) -> list[TurnStats]:
    model = EngineModel(engine, settings, pin=_pin_calls(task.max_turns), reuse_session=reuse)
    result = AgentLoop(model, builtin_tools()).run(task)
    assert [t.result for t in result.turns[:-1]] == [
        {"result": (i + 2) * (i + 3)} for i in range(task.max_turns - 1)
    ], "the pinned calls did not run"
    return model.stats


def _pinning(checkpoint: str, problems: int) -> None:
    from blockpress.workers.agent_model import pin_tool_call_skeleton
    from blockpress.workers.tinytrain.data import held_out_problems
    from blockpress.workers.tinytrain.evaluate import last_number

    engine = DiffusionEngine.from_pretrained(checkpoint, device="cpu")
    print(f"{checkpoint}: {problems} held-out problems, seed i for problem i, default denoising settings")
    print(f"{'':10}{'accuracy':>10}{'good 1st call':>15}{'1st turn steps':>16}{'1st canvas ms':>15}")
    for name, pin in (("free", None), ("pinned", pin_tool_call_skeleton)):
        correct = good = steps = 0
        seconds = 0.0
        for i, problem in enumerate(held_out_problems(problems)):
            model = EngineModel(engine, DenoiseSettings(seed=i), pin=pin)
            task = AgentTask.from_instructions(problem.question, tools=("calculator",), max_turns=4)
            result = AgentLoop(model, builtin_tools()).run(task)
            correct += last_number(result.text) == problem.answer and result.stop_reason == "final_answer"
            first = result.turns[0]
            good += first.call is not None and first.call["arguments"] == {"expression": problem.expression}
            steps += model.stats[0].steps
            seconds += sum(s.first_canvas_s for s in model.stats[:1])
        print(f"{name:10}{correct / problems:>10.0%}{good / problems:>15.0%}{steps / problems:>16.1f}"
              f"{1000 * seconds / problems:>15.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="full DiffusionGemma shape (needs a GPU)")
    parser.add_argument("--context-tokens", type=int, default=None, help="document in the first message")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="fixed denoising steps per canvas")
    parser.add_argument("--pinning", metavar="CHECKPOINT", help="measure the pinned tool-call skeleton instead")
    parser.add_argument("--problems", type=int, default=50, help="held-out problems for --pinning")
    args = parser.parse_args()
    if args.pinning:
        _pinning(args.pinning, args.problems)
        return

    torch.manual_seed(0)
    if args.full_size:
        if not torch.cuda.is_available():
            raise SystemExit("--full-size needs a CUDA GPU: the full model is about 50 GB in bf16")
        config, context, dtype = FULL_SIZE, args.context_tokens or 16_384, "bfloat16"
    else:
        config, context, dtype = CPU, args.context_tokens or 4096, "float32"
    with tempfile.TemporaryDirectory() as tmp:
        engine = DiffusionEngine.from_pretrained(build_tiny_checkpoint(Path(tmp) / "b", **config), dtype=dtype)
    # The test tokenizer is byte-level: one character of the document is one token.
    document = ("The quick brown fox jumps over the lazy dog. " * (context // 45 + 1))[:context]
    task = AgentTask.from_instructions(
        f"{document}\nUse the calculator for every product.", tools=("calculator",), max_turns=args.turns
    )
    settings = DenoiseSettings(
        max_new_tokens=engine.canvas_length, max_denoising_steps=args.steps, confidence_threshold=0.0, seed=0
    )
    threads = torch.get_num_threads()
    print(f"device {engine.device} {engine.dtype}, {threads} threads; canvas {engine.canvas_length}, "
          f"{args.steps} fixed steps; {args.turns} turns over a {context}-token document")  # fmt: skip

    _run(engine, task, settings, reuse=True)  # warm-up: allocator, kernels
    reused = _run(engine, task, settings, reuse=True)
    fresh = _run(engine, task, settings, reuse=False)

    print(f"{'turn':>4}{'prompt tok':>12}{'encoded (reuse)':>17}{'first canvas reuse ms':>23}"
          f"{'re-prefill ms':>15}")  # fmt: skip
    for i, (r, f) in enumerate(zip(reused, fresh, strict=True)):
        print(f"{i + 1:>4}{r.prompt_tokens:>12}{r.prompt_tokens - r.reused_tokens:>17}"
              f"{1000 * r.first_canvas_s:>23.1f}{1000 * f.first_canvas_s:>15.1f}")  # fmt: skip
    later_r = statistics.mean(s.first_canvas_s for s in reused[1:])
    later_f = statistics.mean(s.first_canvas_s for s in fresh[1:])
    print(f"turns 2+: time to first committed canvas {1000 * later_r:.1f} ms with the KV cache reused, "
          f"{1000 * later_f:.1f} ms with a full re-prefill; ratio {later_f / later_r:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
