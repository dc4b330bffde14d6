"""`blockpress demo`: start everything on one machine, run a generation and an agent task, stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blockpress.runtime import AgentResult, Client
from blockpress.runtime.cli.output import print_agent_events, print_events
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import JobError
from blockpress.runtime.contracts.jobs import EventType, new_job_id
from blockpress.runtime.sdk.results import job_outcome

__all__ = ["demo"]


async def demo(args: argparse.Namespace) -> int:
    from blockpress.runtime.cli.embedded import embedded_runtime

    with tempfile.TemporaryDirectory(prefix="blockpress-demo-") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
        settings = RuntimeSettings(models=tuple(args.model or ()), port=0, data_dir=data_dir, replicas=1, drain_s=5.0)
        print("starting redis-server, Ray, one replica and the gateway ...", flush=True)
        started = time.perf_counter()
        async with embedded_runtime(settings) as gateway:
            name = gateway.default_model
            print(f"ready in {time.perf_counter() - started:.1f} s; model {name} on port {gateway.port}")
            address = f"127.0.0.1:{gateway.port}"
            # Blocking client calls, in a thread: this loop serves the gateway meanwhile.
            generated = await asyncio.to_thread(_demo_generation, address, args)
            answered = await asyncio.to_thread(_demo_agent, address, args)
            print("shutting down ...", flush=True)
        print("done.")
    return 0 if generated and answered else 1


def _demo_generation(address: str, args: argparse.Namespace) -> bool:
    """One plain generation job: the prompt as a user message with the calculator declared, so the shipped
    checkpoint (trained only on such chat turns) answers with its tool call rather than noise."""
    from blockpress.agents.builtins import calculator_tool

    print(
        f"\n=== generation ===\nprompt: {args.prompt!r} (a user message; tools: calculator)\n--- streamed canvases ---",
        flush=True,
    )
    messages = [{"role": "user", "content": args.prompt}]
    tools = [calculator_tool().declaration()]
    with Client(address, timeout=300) as client:
        events = client.stream(messages, tools=tools, max_new_tokens=args.max_new_tokens, seed=0)
        final = print_events(events, drafts=False)
    print("--- result ---")
    if final is None or final.type != EventType.COMPLETED:
        print(f"the job ended {final.type if final else 'without a final event'}: {final.data if final else ''}")
        return False
    d = final.data
    print(f"text: {d['text']!r}")
    for call in d.get("tool_calls") or ():
        print(f"tool call: {call['name']}({json.dumps(call.get('arguments') or {})})")
    print(f"stop: {d['stop_reason']}, canvases: {d['canvases']}, usage: {d['usage']}")
    print("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in d["timings"].items()))
    return True


def _demo_agent(address: str, args: argparse.Namespace) -> bool:
    """One agent task with the calculator through the same service; True when it ran to its end (a
    small or untrained checkpoint may still stop at the turn limit, which is shown, not hidden)."""
    print(f"\n=== agent task, tool: calculator ===\ntask: {args.task!r}\n--- streamed events ---", flush=True)
    job_id = new_job_id()
    with Client(address, timeout=300) as client:
        events = client.agent_stream(
            args.task, tools=["calculator"], max_turns=args.max_turns, job_id=job_id, seed=0, max_seconds=120
        )
        # Everything on stdout, in the order it came; the answer follows under "result".
        seen = print_agent_events(events, out=sys.stdout, err=sys.stdout, answer=False)
    print("--- result ---")
    try:
        result = job_outcome(job_id, seen) if seen else None
    except JobError as exc:
        print(f"the task ended: {exc}")
        return False
    if not isinstance(result, AgentResult):
        print("the task ended without a final event")
        return False
    print(f"answer: {result.text!r}")
    print(f"stop: {result.stop_reason}, turns: {result.turns}, tool calls: {len(result.tool_calls)}")
    for c in result.tool_calls:
        print(f"  turn {c.turn}: {c.name}({json.dumps(c.arguments)}) -> {c.result}")
    _demo_trace(client_address=address, job_id=job_id)
    return True


def _demo_trace(*, client_address: str, job_id: str) -> None:
    """The agent task's waterfall, as `blockpress trace JOB_ID` shows it."""
    from blockpress.runtime.contracts.errors import NotFound
    from blockpress.runtime.tracing.view import render_text

    print("\n=== where the agent task's time went (blockpress trace) ===", flush=True)
    spans: list[Any] = []
    with Client(client_address, timeout=30) as client:
        give_up = time.monotonic() + 10
        # Spans are kept off the hot path, a moment after the job's final event.
        while time.monotonic() < give_up:
            with contextlib.suppress(NotFound):
                spans = client.trace(job_id)
            if any(s.name == "replica.run" for s in spans):
                break
            time.sleep(0.2)
    print(render_text(spans) if spans else "no trace kept (tracing off?)")
