"""`AsyncClient.submit_many`: many jobs queued in few calls.

The requests go in SubmitMany calls of up to `CHUNK`, `CALLS` of them in flight: per job that is a
small share of one gRPC call instead of a whole one, which on a loaded gateway is most of what
admitting a job costs. Every request carries its job id (chosen by the SDK), so sending a request
again is idempotent: a call that failed as a whole is retried like any other call, and a request
answered UNAVAILABLE (no replica live yet, the gateway draining) goes again in a later call within
the same retry budget. Against a gateway older than SubmitMany the requests go one Submit each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import grpc

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import BlockPressError, from_rpc_status

from .calls import Deadline, backoff

if TYPE_CHECKING:
    from .aio import AsyncClient

__all__ = ["CALLS", "CHUNK", "submit_all"]

CHUNK = 100
"""Requests per SubmitMany call (the gateway takes up to 1,000): large enough that the call's own
cost is spread thin, small enough that one call's reply does not wait long for its slowest job."""
CALLS = 4
"""SubmitMany calls in flight at once, so the gateway admits one batch while the next is on the wire."""

Outcome: TypeAlias = str | BlockPressError
"""A request's job id, or the error its submit met."""


async def submit_all(client: AsyncClient, requests: Sequence[pb.SubmitRequest], timeout: float | None) -> list[Outcome]:
    """Queues `requests`; their outcomes in the same order. `timeout` bounds the whole of it and is
    every job's deadline (None: the client's default)."""
    batch = _Batch(client, requests, Deadline(timeout if timeout is not None else client.timeout))
    starts = iter(range(0, len(requests), CHUNK))

    async def worker() -> None:
        for start in starts:
            await batch.send(list(range(start, min(start + CHUNK, len(requests)))))

    await asyncio.gather(*(worker() for _ in range(CALLS)))
    return batch.out


class _Batch:
    """One `submit_all`: its requests, their shared deadline, and the outcomes so far."""

    def __init__(self, client: AsyncClient, requests: Sequence[pb.SubmitRequest], deadline: Deadline) -> None:
        self.client, self.requests, self.deadline = client, requests, deadline
        self.out: list[Outcome] = [""] * len(requests)

    async def send(self, indices: list[int]) -> None:
        """Sends the requests at `indices` in one call, then those answered UNAVAILABLE again."""
        client, failures, since = self.client, 0, time.monotonic()
        while True:
            try:
                call = pb.SubmitManyRequest(requests=[self.requests[i] for i in indices])
                reply = await client._call(client._stub.SubmitMany, call, self.deadline.remaining())
            except BlockPressError as err:
                if err.code is grpc.StatusCode.UNIMPLEMENTED:
                    await self.one_by_one(indices)
                    return
                for i in indices:  # the call failed as a whole (a wrong key, the deadline): so did each request
                    self.out[i] = err
                return
            again, unavailable = [], None
            for i, result in zip(indices, reply.results, strict=True):
                outcome = result.job.job_id if result.HasField("job") else from_rpc_status(result.error)
                self.out[i] = outcome
                if isinstance(outcome, BlockPressError) and outcome.code is grpc.StatusCode.UNAVAILABLE:
                    again.append(i)
                    unavailable = outcome
            if unavailable is None:
                return
            failures += 1
            wait = backoff(failures - 1)
            if not client._may_retry(unavailable, failures, since) or not self.deadline.allows(wait):
                return  # each keeps the UNAVAILABLE it was answered with
            await asyncio.sleep(wait)
            indices = again

    async def one_by_one(self, indices: list[int]) -> None:
        """A gateway without SubmitMany (a rolling upgrade): one Submit per request, all at once."""

        async def one(request: pb.SubmitRequest) -> Outcome:
            try:
                reply = await self.client._call(self.client._stub.Submit, request, self.deadline.remaining())
            except BlockPressError as err:
                return err
            return reply.job_id

        for i, outcome in zip(indices, await asyncio.gather(*[one(self.requests[i]) for i in indices]), strict=True):
            self.out[i] = outcome
