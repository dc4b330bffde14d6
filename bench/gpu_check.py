"""One GPU, one JSON: transformers' generate() and the engine in bf16, fp8 and nf4, full-size random model.

    python bench/gpu_check.py                      # one H100/H200: about 8 minutes
    python bench/gpu_check.py --tiny               # the same path at toy size on the CPU (no GPU figures)

vLLM's published method: 4,096 prompt tokens, 512 new tokens (two canvases), 16 fixed denoising steps
per canvas (the adaptive stop off, so every run does the same decoder passes). Each precision's model
is drawn at random directly on the device and quantized layer by layer as it is built; a step's cost
does not depend on what the weights are. Per run:

- decode_tok_s: new tokens / the time after the prompt's prefill (the engine's denoising time; for
  generate(), end-to-end minus a separately timed prefill of the same prompt);
- e2e_tok_s: new tokens / the whole call; ttfc_ms: time to the first committed canvas;
- ms_per_step: that decode time over the decoder passes; peak_gpu_gb: torch's peak allocation in
  the run, weights included.
The targets the design aims at (H100) are printed beside them. A run that fails records its error
and the others still run; the JSON is printed whatever happens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from engine_vs_transformers import engine_run, transformers_run
from full_size import full_size_config, random_engine

from blockpress.workers import DenoiseSettings
from blockpress.workers.testing import tiny_config

TARGETS = {
    "engine_fp8_decode_tok_s": 1800,
    "engine_nf4_decode_tok_s": 3000,
    "ttfc_ms_at_4096_prompt_tokens": 250,
}
RUNS = ("transformers_bf16", "engine_bf16", "engine_fp8", "engine_nf4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy size on the CPU: checks the path, measures nothing")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 4096 (tiny: 48)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 512 (tiny: 64)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (median)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the runs that would start past this")
    args = parser.parse_args(argv)
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}")
    args.prompt_tokens = args.prompt_tokens or (48 if args.tiny else 4096)
    args.new_tokens = args.new_tokens or (64 if args.tiny else 512)
    return args


def model_config(tiny: bool) -> Any:
    """The published shape, or a toy one of the same architecture (canvas 32) for --tiny."""
    if tiny:
        return tiny_config(vocab_size=512, canvas_length=32, num_layers=2, hidden_size=64, num_experts=4)
    return full_size_config()


def _peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _prefill_s(engine: Any, prompt: list[int]) -> float:
    """The encoder's prefill of `prompt` alone, as generate() does it first."""
    session = engine.new_session()
    if engine.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        session.prefill(prompt)
    if engine.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(name: str, engine: Any, prompt: list[int], settings: DenoiseSettings, repeats: int) -> dict[str, Any]:
    device = "cuda" if engine.device.startswith("cuda") else "cpu"
    steps = -(-(settings.max_new_tokens or 0) // engine.canvas_length) * (settings.max_denoising_steps or 0)
    if name.startswith("transformers"):
        transformers_run(engine, prompt, settings)  # warm-up
        _reset_peak(device)
        runs = [transformers_run(engine, prompt, settings) for _ in range(repeats)]
        prefill = statistics.median(_prefill_s(engine, prompt) for _ in range(repeats))
        total = statistics.median(r[0] for r in runs)
        tokens, ttfc, decode = runs[0][1], statistics.median(r[2] for r in runs), total - prefill
    else:
        engine_run(engine, prompt, settings)  # warm-up: Triton compiles, graphs capture
        _reset_peak(device)
        runs = [engine_run(engine, prompt, settings) for _ in range(repeats)]
        total = statistics.median(r[0] for r in runs)
        tokens, ttfc, decode = runs[0][1], statistics.median(r[2] for r in runs), statistics.median(r[3] for r in runs)
    graph = getattr(getattr(engine, "_denoiser", None), "_decoder_pass", None)
    return {
        "cuda_graph_in_use": bool(graph is not None and graph.enabled) and device == "cuda",
        "decode_tok_s": round(tokens / decode, 1),
        "e2e_tok_s": round(tokens / total, 1),
        "ttfc_ms": round(1000 * ttfc, 1),
        "ms_per_step": round(1000 * decode / max(1, steps), 2),
        "peak_gpu_gb": _peak_gb(device),
        "new_tokens": tokens,
        "precision": engine.precision,
        "kernels": engine.kernels,
    }


def run_all(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU (use --tiny to check the path on the CPU)")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = model_config(args.tiny)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(config.text_config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "steps_per_canvas": args.steps,
        "cuda_graphs": not args.no_cuda_graphs and device == "cuda",
        "targets_h100": TARGETS,
        "runs": {},
    }
    wanted = args.runs.split(",")
    groups = [(None, [r for r in ("transformers_bf16", "engine_bf16") if r in wanted])]
    groups += [(q, [f"engine_{q}"]) for q in ("fp8", "nf4") if f"engine_{q}" in wanted]
    torch.manual_seed(0)
    prompt = torch.randint(3, config.text_config.vocab_size, (args.prompt_tokens,)).tolist()
    for quantization, names in groups:
        if not names:
            continue
        if time.perf_counter() - started > args.budget_s:
            for name in names:
                report["runs"][name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
            continue
        engine = None
        try:
            built = time.perf_counter()
            engine = random_engine(
                config, device=device, dtype=dtype, quantization=quantization, kernels=args.kernels,
                cuda_graphs=not args.no_cuda_graphs,
            )  # fmt: skip
            build_s = time.perf_counter() - built
            settings = engine.resolve(
                DenoiseSettings(
                    max_new_tokens=args.new_tokens,
                    max_denoising_steps=args.steps,
                    confidence_threshold=0.0,
                    stop_token_ids=(),
                    seed=0,
                )
            )
            for name in names:
                try:
                    report["runs"][name] = measure(name, engine, prompt, settings, args.repeats)
                    report["runs"][name]["build_s"] = round(build_s, 1)
                except Exception as exc:
                    report["runs"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(-3)}
        except Exception as exc:
            for name in names:
                report["runs"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(-3)}
        finally:
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    emit(report)
    return report


def main() -> None:
    run_all(parse_args(), emit=lambda report: print(json.dumps(report, indent=2)))


if __name__ == "__main__":
    main()
