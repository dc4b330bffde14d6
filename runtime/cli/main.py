"""The `blockpress` command.

    blockpress serve [--model PATH_OR_ID] [--replicas N] [--port P] [--data-dir D]
                     [--redis-url URL] [--ray-address ADDR]    everything on one machine
    blockpress gateway / blockpress replicas                    the two halves, for a cluster
    blockpress generate "prompt" [--drafts]                     stream a generation to the terminal
    blockpress agent "task" --tool calculator [--max-turns N]   run an agent task, streaming its events
    blockpress jobs [ID] | cancel ID | models                   look at and steer jobs
    blockpress demo                                             start, generate and run an agent, stop
    blockpress trace JOB_ID | stats ...                         where a job's time went

Flags become `RuntimeSettings` keyword arguments, so they win over `BLOCKPRESS_*` variables. This is
the only place that configures logging and reads the process's signals.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blockpress.runtime import AgentResult, Client
from blockpress.runtime.cli.output import print_agent_events, print_events
from blockpress.runtime.config import DEFAULT_HTTP_PORT, RuntimeSettings
from blockpress.runtime.contracts.errors import BlockPressError, JobError
from blockpress.runtime.contracts.jobs import EventType, new_job_id
from blockpress.runtime.sdk.results import job_outcome

__all__ = ["main"]

log = logging.getLogger("blockpress")


def _settings(args: argparse.Namespace) -> RuntimeSettings:
    given = {
        "models": args.model or None,
        "replicas": getattr(args, "replicas", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "data_dir": getattr(args, "data_dir", None),
        "redis_url": getattr(args, "redis_url", None),
        "ray_address": getattr(args, "ray_address", None),
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
        "quantization": getattr(args, "quantization", None),
        "min_replicas": getattr(args, "min_replicas", None),
        "max_replicas": getattr(args, "max_replicas", None),
        "pool_metrics_port": getattr(args, "metrics_port", None),
        "http_port": _http_port(args),
    }
    return RuntimeSettings(**{k: v for k, v in given.items() if v is not None})


def _http_port(args: argparse.Namespace) -> str | int | None:
    """`--http-port`; the servers serve HTTP on `DEFAULT_HTTP_PORT` unless the flag or the environment
    says otherwise (`off`)."""
    if getattr(args, "http_port", None) is not None:
        return str(args.http_port)
    if args.command in ("serve", "gateway") and "BLOCKPRESS_HTTP_PORT" not in os.environ:
        return DEFAULT_HTTP_PORT
    return None


async def _until_signal(stop: Callable[[], Any]) -> None:
    """Waits for SIGTERM or SIGINT, then awaits `stop()` (the drain)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("signal received; draining")
    await stop()


# ---- servers ------------------------------------------------------------------------------------------


def _freeze_startup_objects() -> None:
    """Moves what start-up made (modules, tokenizer, servers) out of the garbage collector's reach.

    It lives as long as the server, and every full collection would walk it again: a pause of tens of
    milliseconds inside some call. Collected first, so no start-up garbage is frozen with it. The
    replicas do the same after loading their model (`workers/replica.py`)."""
    gc.collect()
    gc.freeze()


async def _serve(settings: RuntimeSettings) -> int:
    from blockpress.runtime.cli.embedded import embedded_runtime

    async with embedded_runtime(settings) as gateway:
        _freeze_startup_objects()
        print(f"blockpress serving {', '.join(gateway.cards)} on {settings.host}:{gateway.port}", flush=True)
        if gateway.http_port is not None:
            print(f"HTTP API at http://{settings.host}:{gateway.http_port}/v1", flush=True)
        # `trace stats` reads the trace store in this Redis; an owned one listens on a port of its own.
        print(f"redis at {gateway.settings.redis_url}", flush=True)
        await _until_signal(gateway.stop)
    return 0


async def _gateway(settings: RuntimeSettings) -> int:
    from blockpress.runtime.cli.embedded import default_models, served_precision, server_tools
    from blockpress.runtime.gateway.cards import load_model_card
    from blockpress.runtime.gateway.server import Gateway
    from blockpress.runtime.tracing.telemetry import setup_tracing

    setup_tracing(
        "blockpress-gateway", redis_url=settings.redis_url_or_default(), retention_s=settings.trace_retention_s
    )

    cards = {}
    for path in default_models(settings):
        card = await asyncio.to_thread(load_model_card, path, precision=served_precision(settings))
        cards[card.name] = card
    gateway = Gateway.from_settings(settings, cards, agent_tools=server_tools(settings))
    await gateway.start()
    _freeze_startup_objects()
    print(f"blockpress gateway on {settings.host}:{gateway.port}", flush=True)
    try:
        await _until_signal(gateway.stop)
    finally:
        await gateway.queue.redis.aclose()
    return 0


def _replicas(settings: RuntimeSettings) -> int:
    from blockpress.runtime.cli.embedded import cluster_pools

    async def run() -> None:
        async with cluster_pools(settings) as (pools, scaler):
            for pool in pools:
                bounds = f"{scaler.policy.min_replicas}..{scaler.policy.max_replicas}" if scaler else "fixed"
                print(f"blockpress replicas: {pool.size} of {pool.model} ({bounds})", flush=True)
            await _until_signal(_noop)

    asyncio.run(run())
    return 0


async def _noop() -> None:
    return None


# ---- clients ------------------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    settings = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    with Client(args.address, api_key=args.api_key, timeout=args.timeout) as client:
        final = print_events(
            client.stream(args.prompt, model=args.model, drafts=args.drafts, **settings), drafts=args.drafts
        )
    if final is not None and final.type == EventType.COMPLETED:
        usage = final.data.get("usage", {})
        timings = final.data.get("timings", {})
        sys.stderr.write(
            f"[{usage.get('completion_tokens', 0)} tokens in {timings.get('total_s', 0.0):.2f} s, "
            f"{final.data.get('canvases', 0)} canvases, stop: {final.data.get('stop_reason', '')}]\n"
        )
        return 0
    sys.stderr.write(f"job ended {final.type if final else 'without a final event'}: {final.data if final else ''}\n")
    return 1


def _agent(args: argparse.Namespace) -> int:
    settings = {"seed": args.seed, "max_denoising_steps": args.max_denoising_steps}
    job_id = args.job_id or new_job_id()  # chosen here, so the summary below can name the job
    budgets = {"max_new_tokens": args.max_new_tokens, "max_seconds": args.max_seconds, "job_id": job_id}
    with Client(args.address, api_key=args.api_key, timeout=args.timeout) as client:
        events = client.agent_stream(
            args.task, tools=args.tool or (), max_turns=args.max_turns, model=args.model, **budgets, **settings
        )
        seen = print_agent_events(events)
    if not seen:
        sys.stderr.write("the job ended without a final event\n")
        return 1
    result = job_outcome(job_id, seen)  # raises the JobError of a failed, cancelled or expired task
    calls = len(result.tool_calls) if isinstance(result, AgentResult) else 0
    turns = result.turns if isinstance(result, AgentResult) else 0
    sys.stderr.write(f"[job {job_id}: {turns} turns, {calls} tool calls, stop: {result.stop_reason}]\n")
    # A limit that ended the task before a final answer is not a success for a script to build on.
    return 0 if result.stop_reason == "final_answer" else 1


def _jobs(args: argparse.Namespace) -> int:
    with Client(args.address, api_key=args.api_key, timeout=args.timeout or 30) as client:
        if args.job_id:
            job = client.get_job(args.job_id)
            print(json.dumps(dataclasses.asdict(job), indent=2))
        else:
            # The gateway keeps no job list (jobs live in Redis by id); per model, what waits and who runs it.
            for m in client.models():
                print(f"{m.name}: {m.queue_depth} queued (max {m.max_queue}), {m.replicas_live} replicas live")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with Client(args.address, api_key=args.api_key, timeout=args.timeout or 30) as client:
        print(client.cancel(args.job_id).value)
    return 0


def _models(args: argparse.Namespace) -> int:
    with Client(args.address, api_key=args.api_key, timeout=args.timeout or 30) as client:
        for m in client.models():
            print(
                f"{m.name}  context {m.context_length}  canvas {m.canvas_length}  {m.dtype}  "
                f"replicas live {m.replicas_live}  queued {m.queue_depth}"
            )
    return 0


# ---- parser -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockpress", description="A distributed runtime for DiffusionGemma.")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: BLOCKPRESS_LOG_LEVEL or INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    def model_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", action="append", help="checkpoint dir or hub id (repeatable; default: tiny)")
        q.add_argument("--redis-url", help="an existing Redis; serve: none starts an owned redis-server")
        q.add_argument("--data-dir", type=Path, help="serve: the owned Redis's append-only file (default .data)")

    def server_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
        q.add_argument("--port", type=int, help="port to listen on (default 50051)")
        q.add_argument("--http-port", help="OpenAI/Anthropic-compatible HTTP API port (default 8000; 0: free; off)")

    def replica_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--replicas", type=int, help="replicas per model (default 1)")
        q.add_argument("--ray-address", help="an existing Ray cluster; none starts a local Ray")
        q.add_argument("--device", help="auto, cpu or cuda")
        q.add_argument("--dtype", help="auto, float32, bfloat16, float16")
        q.add_argument(
            "--quantization", choices=("nf4", "fp8"), help="packed weights, quantized as they load (default: none)"
        )

    q = sub.add_parser("serve", help="run Redis, Ray, replicas and the gateway on this machine")
    model_flags(q)
    server_flags(q)
    replica_flags(q)
    q = sub.add_parser("gateway", help="run the gRPC gateway against an existing Redis")
    model_flags(q)
    server_flags(q)
    q = sub.add_parser("replicas", help="run replicas against an existing Redis and Ray (a RayJob's entrypoint)")
    model_flags(q)
    replica_flags(q)
    q.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas per model (default --replicas)")
    q.add_argument("--max-replicas", type=int, help="autoscale on the queue up to this many per model")
    q.add_argument("--metrics-port", type=int, help="serve the autoscaler's Prometheus /metrics here")

    def client_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--address", help="gateway host:port (default BLOCKPRESS_ADDRESS, then 127.0.0.1:50051)")
        q.add_argument("--api-key", default=None, help="API key (default: BLOCKPRESS_API_KEY)")
        q.add_argument("--timeout", type=float, help="deadline in seconds")

    q = sub.add_parser("generate", help="stream a generation's committed canvases to the terminal")
    q.add_argument("prompt")
    q.add_argument("--model")
    q.add_argument("--max-new-tokens", type=int)
    q.add_argument("--seed", type=int)
    q.add_argument("--drafts", action="store_true", help="also show the canvas while it is denoised")
    client_flags(q)
    q = sub.add_parser("agent", help="run an agent task with server-side tools, streaming its events")
    q.add_argument("task")
    q.add_argument("--tool", action="append", help="a tool the agent may call (repeatable): calculator, python, ...")
    q.add_argument("--max-turns", type=int, help="model turns before it stops (default: the server's)")
    q.add_argument("--max-new-tokens", type=int, help="budget of new tokens over all turns")
    q.add_argument("--max-seconds", type=float, help="budget of wall-clock seconds")
    q.add_argument("--max-denoising-steps", type=int, help="denoising step limit per canvas")
    q.add_argument("--model")
    q.add_argument("--seed", type=int)
    q.add_argument("--job-id", help="idempotency key: the same id again follows the same job")
    client_flags(q)
    q = sub.add_parser("jobs", help="show a job, or the queues when no id is given")
    q.add_argument("job_id", nargs="?")
    client_flags(q)
    q = sub.add_parser("cancel", help="cancel a job")
    q.add_argument("job_id")
    client_flags(q)
    q = sub.add_parser("models", help="list the served models")
    client_flags(q)
    q = sub.add_parser("demo", help="start the embedded runtime, run a generation and an agent task, stop")
    q.add_argument("--prompt", default="What is 37*41+12?")
    q.add_argument("--task", default="What is 37*41+12?", help="the agent task, run with the calculator tool")
    q.add_argument("--max-turns", type=int, default=4)
    q.add_argument("--model", action="append")
    q.add_argument("--max-new-tokens", type=int, default=64)
    q.add_argument("--data-dir", help="keep the demo's Redis data here (default: a temporary directory)")
    from blockpress.runtime.cli.deadletters import add_dead_letter_commands

    add_dead_letter_commands(sub)
    try:
        # One job's trace comes through the gateway's GetTrace (`Client.trace`), `stats` from Redis.
        from blockpress.runtime.cli.trace import add_trace_commands

        add_trace_commands(sub)
    except ImportError:  # the trace inspector is optional
        pass
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `blockpress` command; returns the exit status."""
    import os

    args = _parser().parse_args(argv)
    level = args.log_level or os.environ.get("BLOCKPRESS_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hasattr(args, "api_key") and args.api_key is None:
        args.api_key = os.environ.get("BLOCKPRESS_API_KEY")
    try:
        if args.command == "serve":
            return asyncio.run(_serve(_settings(args)))
        if args.command == "gateway":
            return asyncio.run(_gateway(_settings(args)))
        if args.command == "replicas":
            return _replicas(_settings(args))
        if args.command == "demo":
            from blockpress.runtime.cli.demo import demo

            return asyncio.run(demo(args))
        commands: dict[str, Callable[[argparse.Namespace], int]] = {
            "generate": _generate,
            "agent": _agent,
            "jobs": _jobs,
            "cancel": _cancel,
            "models": _models,
        }
        if args.command in commands:
            return commands[args.command](args)
        return int(args.func(args))
    except JobError as exc:
        print(f"blockpress: {exc}", file=sys.stderr)
        return 1
    except BlockPressError as exc:
        print(f"blockpress: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
