"""What tracing costs the engine: the same generations with tracing on and off, interleaved.

    python bench/tracing_overhead.py                # the engine benchmark's CPU checkpoint (vocab 8,192)
    python bench/tracing_overhead.py --tiny         # the test checkpoint: the shortest steps, worst case

"On" is what a replica runs: `setup_tracing` with the trace store in a private redis-server (and OTLP
export when OTEL_EXPORTER_OTLP_ENDPOINT is set), a `replica.run` span and `TracedEngine`, whose canvas
spans carry one event per denoising step. "Off" is the same code with OpenTelemetry's no-op tracer.
Fixed steps and a fixed seed make every run do the same work.

Three figures are printed. The A/B figures compare medians of interleaved runs, in wall time and in
process CPU time; on a shared machine the wall-time noise can exceed the effect. The isolated figure
replays one generation's recorded events through the tracing wrapper many times and divides that cost
by the median untraced generation time: the cost itself, without the engine's noise.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
import torch
from opentelemetry import trace

from blockpress.runtime.tracing.store import TraceStoreProcessor
from blockpress.runtime.tracing.telemetry import SpanName, setup_tracing
from blockpress.workers import DenoiseSettings, DiffusionEngine
from blockpress.workers.testing import build_tiny_checkpoint
from blockpress.workers.traced import TracedEngine, trace_stream

CPU_CONFIG: dict[str, Any] = {
    "vocab_size": 8192,
    "hidden_size": 256,
    "num_layers": 4,
    "num_experts": 8,
    "canvas_length": 256,
}


def _redis(tmp: Path) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not found: tracing on without the trace store")
        return None, None
    sock = tmp / "redis.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--save", ""], stdout=subprocess.DEVNULL)
    url = f"unix://{sock}"
    for _ in range(500):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.01)
    raise SystemExit("redis-server did not start")


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the test checkpoint (shortest steps, worst case)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved on/off pairs")
    parser.add_argument("--steps", type=int, default=16, help="fixed denoising steps per canvas")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 keeps OpenMP spin-waits out of the CPU-time figure"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = {} if args.tiny else CPU_CONFIG
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        engine = DiffusionEngine.from_pretrained(build_tiny_checkpoint(tmp / "ckpt", seed=0, **config))
        new_tokens = args.new_tokens or engine.canvas_length
        settings = DenoiseSettings(
            max_new_tokens=new_tokens,
            max_denoising_steps=args.steps,
            confidence_threshold=0.0,
            stop_token_ids=(),
            seed=0,
        )
        prompt = torch.randint(3, engine.vocab_size, (64,)).tolist()
        proc, url = _redis(tmp)
        try:
            # The processor `setup_tracing(redis_url=...)` would add, made here so its counters can be read.
            store = TraceStoreProcessor.from_url(url, retention_s=3600) if url else None
            provider = setup_tracing("bench", processors=(store,) if store else (), set_global=False)
            on_tracer, off_tracer = provider.get_tracer("bench"), trace.NoOpTracer()

            def run(tracer: trace.Tracer) -> None:
                with tracer.start_as_current_span(SpanName.REPLICA_RUN):
                    TracedEngine(engine, tracer=tracer).generate(prompt, settings)

            run(on_tracer)  # warm-up: allocator, kernels, the store's connection
            run(off_tracer)
            on: list[tuple[float, float]] = []
            off: list[tuple[float, float]] = []
            pair: list[tuple[trace.Tracer, list[tuple[float, float]]]] = [(on_tracer, on), (off_tracer, off)]
            for i in range(args.rounds):  # alternate the order, so drift in machine load hits both alike
                for tracer, sink in pair if i % 2 else pair[::-1]:
                    wall, cpu = time.perf_counter(), time.process_time()
                    run(tracer)
                    sink.append((time.perf_counter() - wall, time.process_time() - cpu))

            events = list(engine.stream(prompt, settings))
            reps = 200

            def replay(tracer: trace.Tracer) -> Iterator[object]:
                with tracer.start_as_current_span(SpanName.REPLICA_RUN):
                    yield from trace_stream(iter(events), tracer=tracer)

            base = min(_timed(lambda: [list(replay(off_tracer)) for _ in range(reps)]) for _ in range(3))
            traced = min(_timed(lambda: [list(replay(on_tracer)) for _ in range(reps)]) for _ in range(3))
            provider.force_flush(30_000)
            provider.shutdown()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)

    steps = sum(1 for e in events if type(e).__name__ == "DraftEvent")
    m_on, m_off = statistics.median(w for w, _ in on), statistics.median(w for w, _ in off)
    c_on, c_off = statistics.median(c for _, c in on), statistics.median(c for _, c in off)
    paired = statistics.median((a[0] - b[0]) / b[0] for a, b in zip(on, off, strict=True))
    per_job = (traced - base) / reps
    print(
        f"checkpoint vocab {engine.vocab_size}, canvas {engine.canvas_length}; device {engine.device}, "
        f"{torch.get_num_threads()} threads; {new_tokens} new tokens, {steps} steps per generation"
    )
    print(
        f"trace store: {'redis (unix socket)' if url else 'off'}"
        + (f", {store.written} spans written, {store.dropped} dropped" if store is not None else "")
    )
    print(f"generation, tracing off: median {m_off * 1e3:8.1f} ms ({m_off / steps * 1e3:.2f} ms per step)")
    print(f"generation, tracing on:  median {m_on * 1e3:8.1f} ms over {args.rounds} interleaved rounds")
    print(f"A/B overhead, wall: {(m_on - m_off) / m_off:+.2%} (medians), {paired:+.2%} (median of paired rounds)")
    # CPU time of the process (every thread, the trace store's writer included) is far less sensitive to
    # other processes on the machine than wall time.
    print(f"A/B overhead, CPU time: {(c_on - c_off) / c_off:+.2%} (medians: {c_off:.2f} s off, {c_on:.2f} s on)")
    print(
        f"isolated tracing cost: {per_job * 1e6:.0f} µs per generation = {per_job / m_off:.3%} "
        f"of an untraced generation ({per_job / steps * 1e6:.1f} µs per step)"
    )


if __name__ == "__main__":
    main()
