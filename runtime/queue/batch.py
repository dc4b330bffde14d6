"""`ScriptBatch`: calls of one Lua script pipelined, the calls made while one pipeline is in flight in the next.

A gateway under a burst of submits made one script call per submit, and redis-py's per-call work
(taking a pooled connection, a send, a read, the retry wrapper) cost more than the script itself: on
the development machine 122 us of CPU per call one by one against 31 us each in pipelines of 64. Here
one pipeline is in flight at a time: a call made while none is goes out at the end of the event-loop
turn (`call_soon`, so a lone call waits for nothing), and the calls made while one is in flight go
together in the next, as soon as it returns. Under load a batch is then what arrived during one round
trip; each call still gets its own reply or error. Only the order within one batch is kept; calls
that must follow each other await each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

__all__ = ["ScriptBatch"]


class ScriptBatch:
    """Runs `script` for each `call`: one pipeline in flight, the calls made meanwhile in the next.

    Args:
        redis: the client whose pool lends the pipeline its connection.
        script: the registered script; its SHA is sent, and it is loaded again on NOSCRIPT (a Redis
            restarted without persistence forgets scripts).
    """

    def __init__(self, redis: aioredis.Redis, script: AsyncScript) -> None:
        self.redis = redis
        self.script = script
        self._pending: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def call(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply for `keys` and `args`; raises its error reply or the connection's error."""
        loop = asyncio.get_running_loop()
        if self._sending is not None and self._sending.get_loop() is not loop:
            # Left by a loop that closed mid-send (a queue outliving its loop): nothing will end it.
            self._sending, self._pending = None, []
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, future))
        if len(self._pending) == 1 and self._sending is None:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        if self._sending is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        # Held here: the loop keeps only a weak reference to a task.
        self._sending = asyncio.get_running_loop().create_task(self._send(batch), name="redis-script-batch")
        self._sending.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending = None
        self._flush()  # what arrived meanwhile

    async def _send(self, batch: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                keys, args, _ = batch[0]
                replies: list[Any] = [await self._one(keys, args)]
            else:
                pipe = self.redis.pipeline(transaction=False)
                for keys, args, _ in batch:
                    pipe.evalsha(self.script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every call of the batch learns it
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                reply = await self._one(keys, args)
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _one(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The reply, or the error as a value. A single call needs no pipeline, and the Script object
        loads the script again on NOSCRIPT."""
        try:
            return await self.script(keys=list(keys), args=list(args))
        except Exception as exc:
            return exc
