"""Job event streams for many open calls over one Redis connection: `EventFanout`.

Holding a pooled Redis connection in `XREAD BLOCK` per open `Generate`/`Watch` call bounded the open
streams by the pool (100) and, once they had taken it, starved health checks and submits. Here one
reader task per gateway owns one connection and blocks in a single `XREAD` over every watched job's
event stream; what comes back is dispatched to each call's buffer. A new call is woken into the read
at once: the reader's blocked `XREAD` is ended with `CLIENT UNBLOCK` from the normal pool and issued
again with the new key (the block timeout bounds the rare wake that loses the race).

A call first reads what already exists (catch-up, non-blocking, on the normal pool, at most
`_POOL_SLOTS` such reads at a time so streams never take the pool from health and submits), then
joins the shared read. A call that falls behind leaves the shared read until it drains its buffer,
so a slow reader costs memory bounded by `_BUFFER`, never the others' latency.

Resuming at or after a job's final event re-sends that final event and ends: every stream that ends
normally ends with the job's final event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from blockpress.runtime.contracts.errors import JobNotFound
from blockpress.runtime.contracts.jobs import Event, loads
from blockpress.runtime.queue.jobqueue import JobQueue

__all__ = ["EventFanout"]

log = logging.getLogger(__name__)

_BATCH = 128
"""Events per stream per read."""
_BUFFER = 512
"""Events a call may have waiting before it leaves the shared read until it catches up."""
_POOL_SLOTS = 32
"""Stream work (catch-up reads, existence checks) on the normal pool at one time."""


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _event(entry_id: Any, fields: Any) -> Event:
    f = {_text(k): _text(v) for k, v in fields.items()}
    return Event(_text(entry_id), f["type"], loads(f["data"]), float(f["ts"]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Subscriber:
    """One open call's place in the shared read: its cursor and the events not yet taken."""

    def __init__(self, job_id: str, after: str) -> None:
        self.job_id = job_id
        self.cursor = _order(after)
        self.after = after
        self.pending: list[Event] = []
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    @property
    def has_room(self) -> bool:
        return len(self.pending) < _BUFFER

    def offer(self, event: Event) -> None:
        order = _order(event.id)
        if order > self.cursor:
            self.pending.append(event)
            self.cursor, self.after = order, event.id
            self.ready.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.ready.set()


class EventFanout:
    """One reader of job event streams, shared by every open call of a gateway.

    Args:
        queue: the job queue; its Redis client lends one connection to the reader for good and serves
            the catch-up reads.
        block_ms: how long one shared `XREAD` blocks; also the longest a lost wake-up delays a join.
        idle_check_s: a call that saw no event for this long checks that its job still exists
            (retention may drop it), so a watch on a vanished job ends with NOT_FOUND.
    """

    def __init__(self, queue: JobQueue, *, block_ms: int = 1000, idle_check_s: float = 5.0) -> None:
        self.queue = queue
        self.block_ms = block_ms
        self.idle_check_s = idle_check_s
        self._subs: dict[str, set[_Subscriber]] = {}
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(_POOL_SLOTS)
        self._reader: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._blocked_id: int | None = None
        self._reader_id: int | None = None
        self._waking: asyncio.Task[None] | None = None

    @property
    def open_streams(self) -> int:
        """Calls currently following a job."""
        return sum(len(subs) for subs in self._subs.values())

    async def start(self) -> None:
        self._reader = self.queue.redis.client()  # one connection of the pool, held for good
        self._task = asyncio.create_task(self._read_loop(), name="gateway-event-fanout")

    async def stop(self) -> None:
        for task in (self._task, self._waking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._reader is not None:
            await self._reader.aclose()
        for subs in self._subs.values():
            for sub in subs:
                sub.fail(ConnectionError("the gateway is stopping"))

    async def follow(self, job_id: str, after: str, *, fresh: bool = False) -> AsyncGenerator[Event]:
        """The job's events after the event id `after` until its final one.

        `fresh`: the caller has just created the job, so it exists and the shared read brings all its
        events from `after`; the catch-up read and the record check (two Redis calls, on the path of
        every new job, while its replica is starting it) are skipped.

        Raises:
            JobNotFound: no such job (or it was dropped by retention while followed).
            RedisError: Redis went away; the caller resumes from the last event it got.
        """
        while not fresh:  # catch up on what exists, on the normal pool
            events = await self._read(job_id, after)
            for event in events:
                yield event
                after = event.id
                if event.is_final:
                    return
            if len(events) < _BATCH:
                break
        if not fresh and await self._is_final(job_id):
            # The final event either came after the read above (then it is read now) or the caller
            # is already at or past it (then it is sent again, so the stream ends as every one does).
            async for event in self._rest_or_last(job_id, after):
                yield event
            return
        sub = _Subscriber(job_id, after)
        self._subs.setdefault(job_id, set()).add(sub)
        self._wake()
        try:
            # Closed here, not left to the garbage collector's finalizer task.
            async with contextlib.aclosing(self._drain(sub)) as drained:
                async for event in drained:
                    yield event
                    if event.is_final:
                        return
        finally:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[job_id]

    async def _is_final(self, job_id: str) -> bool:
        async with self._slots:
            return (await self.queue.get(job_id)).state.is_final

    async def _drain(self, sub: _Subscriber) -> AsyncGenerator[Event]:
        while True:
            try:
                # A timeout scope rather than wait_for, which wraps the wait in a task of its own per event.
                async with asyncio.timeout(self.idle_check_s):
                    await sub.ready.wait()
            except TimeoutError:
                async with self._slots:
                    if not await self.queue.redis.exists(self.queue.keys.job(sub.job_id)):
                        raise JobNotFound(sub.job_id) from None
                continue
            if sub.error is not None:
                raise sub.error
            batch, sub.pending = sub.pending, []
            sub.ready.clear()
            if len(batch) >= _BUFFER:
                self._wake()  # it had left the shared read while full
            for event in batch:
                yield event

    async def _read(self, job_id: str, after: str) -> list[Event]:
        async with self._slots:
            return await self.queue.read_events(job_id, after, count=_BATCH)

    async def _rest_or_last(self, job_id: str, after: str) -> AsyncIterator[Event]:
        while events := await self._read(job_id, after):
            for event in events:
                yield event
                after = event.id
                if event.is_final:
                    return
        async with self._slots:
            last = await self.queue.redis.xrevrange(self.queue.keys.events(job_id), count=1)
        for entry_id, fields in last:
            yield _event(entry_id, fields)

    # ---- the shared reader ----------------------------------------------------------------------

    def _wake(self) -> None:
        """Makes the reader re-issue its read with the current set of calls."""
        self._changed.set()
        if self._blocked_id is not None and (self._waking is None or self._waking.done()):
            self._waking = asyncio.create_task(self._unblock(self._blocked_id), name="gateway-fanout-wake")

    async def _unblock(self, client_id: int) -> None:
        # The UNBLOCK may reach Redis before the XREAD it targets; try again until that read returned.
        for _ in range(50):
            if self._blocked_id != client_id:
                return
            try:
                if await self.queue.redis.client_unblock(client_id):
                    return
            except RedisError:
                return  # the reader meets the same trouble and reports it
            await asyncio.sleep(0.002)
        self._reader_id = None  # never unblocked: the connection may have been replaced; ask again

    def _streams(self) -> dict[Any, Any]:
        keys = self.queue.keys
        streams: dict[Any, Any] = {}
        for job_id, subs in self._subs.items():
            ready = [s for s in subs if s.has_room]
            if ready:
                streams[keys.events(job_id)] = min(ready, key=lambda s: s.cursor).after
        return streams

    async def _read_loop(self) -> None:
        assert self._reader is not None
        backoff = 0.05
        while True:
            streams = self._streams()
            if not streams:
                self._changed.clear()
                await self._changed.wait()
                continue
            self._changed.clear()
            try:
                # The reader's id changes only with its connection; asked again after any failure.
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                client_id = self._reader_id
                if self._changed.is_set():
                    continue  # the set changed meanwhile: read the new one
                self._blocked_id = client_id
                reply: Any = await self._reader.xread(streams, count=_BATCH, block=self.block_ms)
            except (RedisError, OSError) as exc:
                self._reader_id = None
                log.warning("event fan-out: Redis read failed (%s); %d open streams told", exc, self.open_streams)
                for subs in self._subs.values():
                    for sub in subs:
                        sub.fail(exc)
                self._subs.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            finally:
                self._blocked_id = None
            backoff = 0.05
            if reply:
                self._dispatch(reply)
                # The woken calls send their events before this task packs and sends the next read.
                await asyncio.sleep(0)

    def _dispatch(self, reply: Any) -> None:
        prefix_len = len(self.queue.keys.events(""))
        for stream, entries in reply:
            job_id = _text(stream)[prefix_len:]
            events = [_event(entry_id, fields) for entry_id, fields in entries]
            for sub in list(self._subs.get(job_id, ())):
                for event in events:
                    sub.offer(event)
