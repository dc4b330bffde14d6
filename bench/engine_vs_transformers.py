"""The engine against transformers' own `generate()`: same checkpoint, same prompt, fixed steps, one run.

    python bench/engine_vs_transformers.py                 # CPU: a ~10M-parameter checkpoint, vocab 8,192
    python bench/engine_vs_transformers.py --full-size     # GPU: the published DiffusionGemma shape, random bf16

Fixed steps (the adaptive stop off) make both sides do the same number of decoder passes, so tokens/s
compares the cost of a step. The full-size run prints decode tok/s (committed tokens over denoising
time), end-to-end tok/s and time to first canvas, the figures vLLM published for H100.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from full_size import full_size_engine

from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.testing import build_tiny_checkpoint


def transformers_run(engine: DiffusionEngine, prompt: list[int], s: DenoiseSettings) -> tuple[float, int, float]:
    """(seconds, new tokens, time to first canvas) for transformers' generate()."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    first: list[float] = []

    class _FirstCanvas:  # a streamer that notes when the first committed canvas arrives
        calls = 0

        def put(self, value: Any) -> None:
            _FirstCanvas.calls += 1
            if _FirstCanvas.calls == 2:  # the first put() is the prompt
                first.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt], device=engine.model.device)
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            ids,
            max_new_tokens=s.max_new_tokens,
            max_denoising_steps=s.max_denoising_steps,
            t_min=s.t_min,
            t_max=s.t_max,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=s.entropy_bound),
            stability_threshold=s.stability_threshold,
            confidence_threshold=1e-30,  # transformers wants > 0; nothing is that confident: fixed steps
            eos_token_id=None,
            streamer=_FirstCanvas(),
        )
    _sync()
    elapsed = time.perf_counter() - start
    return elapsed, out.sequences.shape[1] - len(prompt), (first[0] - start) if first else elapsed


def engine_run(engine: DiffusionEngine, prompt: list[int], s: DenoiseSettings) -> tuple[float, int, float, float]:
    """(seconds, new tokens, time to first canvas, denoising seconds) for the engine."""
    _sync()
    start = time.perf_counter()
    result = engine.generate(prompt, s)
    _sync()
    return time.perf_counter() - start, len(result.token_ids), result.timings.first_canvas_s, result.timings.denoise_s


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="full DiffusionGemma shape (needs a GPU)")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.full_size:
        if not torch.cuda.is_available():
            raise SystemExit("--full-size needs a CUDA GPU: the full model is about 50 GB in bf16")
        new_tokens, prompt_tokens = args.new_tokens or 512, args.prompt_tokens or 4096
        engine = full_size_engine()
    else:
        config = {"vocab_size": 8192, "hidden_size": 256, "num_layers": 4, "num_experts": 8, "canvas_length": 256}
        new_tokens, prompt_tokens = args.new_tokens or 256, args.prompt_tokens or 64
        with tempfile.TemporaryDirectory() as tmp:
            path = build_tiny_checkpoint(Path(tmp) / "bench", seed=0, **config)
            engine = DiffusionEngine.from_pretrained(path, dtype="float32")
    params = sum(p.numel() for n, p in engine.model.named_parameters() if "vision" not in n)
    prompt = torch.randint(3, engine.vocab_size, (prompt_tokens,)).tolist()
    settings = engine.resolve(
        DenoiseSettings(
            max_new_tokens=new_tokens,
            max_denoising_steps=args.steps,
            confidence_threshold=0.0,
            stop_token_ids=(),
            seed=0,
        )
    )
    print(
        f"checkpoint: {params / 1e6:.1f}M parameters (text), vocab {engine.vocab_size}, canvas {engine.canvas_length}"
    )
    print(
        f"device {engine.device} {engine.dtype}, {torch.get_num_threads()} threads; prompt {prompt_tokens} tokens, "
        f"{new_tokens} new tokens, {args.steps} fixed steps per canvas, {args.repeats} repeats (median)"
    )

    engine_run(engine, prompt, settings)  # warm-up: allocator, kernels
    transformers_run(engine, prompt, settings)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        ours.append(engine_run(engine, prompt, settings))
        theirs.append(transformers_run(engine, prompt, settings))

    e_time = statistics.median(r[0] for r in ours)
    t_time = statistics.median(r[0] for r in theirs)
    tokens = ours[0][1]
    canvases = -(-new_tokens // engine.canvas_length)
    print(f"{'':24}{'engine':>12}{'transformers':>14}")
    print(f"{'end-to-end tok/s':24}{tokens / e_time:12.1f}{theirs[0][1] / t_time:14.1f}")
    steps = canvases * args.steps
    print(f"{'ms per step':24}{1000 * e_time / steps:12.1f}{1000 * t_time / steps:14.1f}")
    print(
        f"{'time to first canvas ms':24}{1000 * statistics.median(r[2] for r in ours):12.1f}"
        f"{1000 * statistics.median(r[2] for r in theirs):14.1f}"
    )
    print(f"{'decode tok/s (engine)':24}{tokens / statistics.median(r[3] for r in ours):12.1f}")
    print(f"speed-up (engine / transformers, end to end): {t_time / e_time:.2f}x")


if __name__ == "__main__":
    main()
