"""`blockpress dead-letters`: list the jobs the queues gave up on, and replay one as a new job.

    blockpress dead-letters --redis-url redis://127.0.0.1:PORT/0            # every model's dead letters
    blockpress dead-letters --model tiny-calculator
    blockpress dead-letters --replay JOB_ID                                 # queued again as JOB_ID.replay-1

It reads Redis directly, as an operator's tool (the gateway has no method for it): `--redis-url`,
else `BLOCKPRESS_REDIS_URL`, else the local default. `serve` prints the URL of the Redis it owns.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from typing import Any

__all__ = ["add_dead_letter_commands"]


def add_dead_letter_commands(subparsers: Any) -> None:
    """Adds the `dead-letters` command to the `blockpress` parser's subcommands."""
    p = subparsers.add_parser("dead-letters", help="list dead-lettered jobs, or replay one (--replay JOB_ID)")
    p.add_argument("--model", action="append", help="only this model's (repeatable; default: every model)")
    p.add_argument("--replay", metavar="JOB_ID", help="queue this dead-lettered job again as a new job")
    p.add_argument("--count", type=int, default=100, help="newest dead letters listed per model (default 100)")
    p.add_argument("--redis-url", help="the runtime's Redis (default: BLOCKPRESS_REDIS_URL, then local)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The command: 0 when done, 1 when the job to replay is not dead-lettered."""
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    import redis.asyncio as aioredis

    from blockpress.runtime.config import RuntimeSettings
    from blockpress.runtime.queue.deadletters import NotDeadLettered, dead_letters, replay
    from blockpress.runtime.queue.jobqueue import JobQueue

    settings = RuntimeSettings()
    client = aioredis.Redis.from_url(args.redis_url or settings.redis_url_or_default(), socket_connect_timeout=5.0)
    try:
        queue = JobQueue(client, max_queue_per_model=settings.max_queue)
        if args.replay:
            try:
                record = await replay(queue, args.replay)
            except NotDeadLettered as exc:
                print(f"blockpress: {exc}", file=sys.stderr)
                return 1
            print(f"replayed {args.replay} as {record.spec.job_id} ({record.state.value})")
            return 0
        models = args.model or await _models_with_dead_letters(queue)
        for model in models:
            for letter in await dead_letters(queue, model, count=args.count):
                at = datetime.datetime.fromtimestamp(letter.at, datetime.UTC).isoformat(timespec="seconds")
                error = letter.error.get("message") or letter.error.get("code") or ""
                print(f"{letter.job_id}\t{model}\t{letter.deliveries} deliveries\t{at}\t{error}")
        return 0
    finally:
        await client.aclose()


async def _models_with_dead_letters(queue: Any) -> list[str]:
    prefix = queue.keys.dead_letter("")
    keys = [key.decode() if isinstance(key, bytes) else key async for key in queue.redis.scan_iter(prefix + "*")]
    return sorted(key[len(prefix) :] for key in keys)
