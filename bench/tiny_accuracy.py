"""Held-out accuracy of the tiny calculator checkpoint through the real engine.

    python bench/tiny_accuracy.py [--checkpoint DIR] [--problems 200] [--seed 0] [--quantization nf4|fp8]

Each held-out problem (operand combinations training never generated) is played out as an agent
would: the engine's tool calls are parsed and evaluated, the results fed back, until a turn answers.
Prints exact-answer accuracy, tool-call validity, mean denoising steps per canvas and tokens per forward,
then each kind of turn's accuracy when the turns before it are right (which turn makes the errors).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from blockpress.workers import DiffusionEngine
from blockpress.workers.checkpoints import TINY_CALCULATOR
from blockpress.workers.tinytrain import held_out_problems
from blockpress.workers.tinytrain.evaluate import evaluate, turn_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TINY_CALCULATOR)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="denoising seeds (the problems are fixed)")
    parser.add_argument("--show-failures", type=int, default=5)
    parser.add_argument(
        "--quantization", choices=["none", "nf4", "fp8"], default="none", help="store the weights packed"
    )
    args = parser.parse_args()

    quantization = None if args.quantization == "none" else args.quantization
    engine = DiffusionEngine.from_pretrained(str(args.checkpoint), device="cpu", quantization=quantization)
    problems = held_out_problems(args.problems)
    started = time.perf_counter()
    report = evaluate(engine, problems, seed=args.seed)
    wall = time.perf_counter() - started
    two_step = [o for o in report.outcomes if o.problem.then_op is not None]
    print(f"checkpoint {args.checkpoint}, precision {engine.precision}")
    print(report.summary())
    print(
        f"single-step exact {sum(o.correct for o in report.outcomes if o.problem.then_op is None)}"
        f"/{len(report.outcomes) - len(two_step)}, two-step exact {sum(o.correct for o in two_step)}/{len(two_step)};"
        f" {wall:.1f} s wall"
    )
    turns = turn_accuracy(engine, problems, seed=args.seed)
    print("each turn given a correct conversation so far: " + ", ".join(f"{k} {r}/{n}" for k, (r, n) in turns.items()))
    failures = [o for o in report.outcomes if not o.correct][: args.show_failures]
    for o in failures:
        print(f"  FAIL {o.problem.question!r} (answer {o.problem.answer}): {o.turns}")


if __name__ == "__main__":
    main()
