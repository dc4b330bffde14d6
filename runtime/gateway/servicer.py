"""The `blockpress.v1.Runtime` methods: each translates its request to a `Gateway` call and back.

Every error a method meets ends the call with the status `contracts.errors.to_status` maps it to;
Redis being unreachable is UNAVAILABLE, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
from redis.exceptions import RedisError

from blockpress.runtime import convert
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.contracts.errors import (
    BlockPressError,
    InvalidArgument,
    ServiceUnavailable,
    status_code,
    to_rpc_status,
    to_status,
)
from blockpress.runtime.gateway.handlers import Traced, record_status
from blockpress.runtime.gateway.streamcap import client_of
from blockpress.runtime.gateway.validation import validate_event_id

if TYPE_CHECKING:
    from blockpress.runtime.contracts.jobs import JobRecord, JobSpec
    from blockpress.runtime.gateway.server import Gateway

__all__ = ["RuntimeServicer"]

log = logging.getLogger(__name__)

_InLine = tuple[pb.SubmitRequest, "asyncio.Future[None] | None", "asyncio.Future[None]"]
"""A SubmitMany request, the turn of the one sent before it, and its own turn (`_submit_one`)."""

MAX_SUBMIT_MANY = 1000
"""Requests one SubmitMany call may carry (the proto says so too)."""
_MANY_AT_ONCE = 25
"""SubmitMany requests admitted together. Measured on the development machine, probing Health/Check
during a 1,000-request call: other calls waited up to 14-20 ms with parts of 25, 30-50 ms with parts of
100, 150-250 ms with the whole call at once; the call itself took as long (~0.3 s) every way."""


class RuntimeServicer(pb_grpc.RuntimeServicer):
    """The service's methods over one `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        try:
            record, created = await self._queue(request, context, again="resubmitted")
        except BaseException as exc:
            await _abort(context, exc)
        return _reference(record, created)

    async def SubmitMany(
        self, request: pb.SubmitManyRequest, context: grpc.aio.ServicerContext, traced: Traced
    ) -> pb.SubmitManyResponse:
        if len(request.requests) > MAX_SUBMIT_MANY:
            many = InvalidArgument("requests", f"has {len(request.requests)}; send at most {MAX_SUBMIT_MANY} per call")
            await _abort(context, many)
        one, loop, results = traced(self._submit_one), asyncio.get_running_loop(), []
        # A part at a time: the short requests of a part are validated one after another without a
        # pause, and other calls are answered between parts. Within a part they are admitted together,
        # so that their submit scripts share Redis pipelines (`queue/batch.py`), and put in line in the
        # order sent: each waits for the one before it (`_submit_one`).
        for at in range(0, len(request.requests), _MANY_AT_ONCE):
            part = request.requests[at : at + _MANY_AT_ONCE]
            turns = [loop.create_future() for _ in part]
            items = [(r, turns[i - 1] if i else None, turns[i]) for i, r in enumerate(part)]
            results += await asyncio.gather(*[one(item) for item in items])
        return pb.SubmitManyResponse(results=results)

    async def _submit_one(self, item: _InLine, context: grpc.aio.ServicerContext) -> pb.SubmitResult:
        """One request of SubmitMany: what Submit would answer, an error as its result, not the call's end.

        Admission may wait (a long prompt is counted in a thread), so requests finish it out of order;
        the submit script of each is only called once the one before it has been called (or refused),
        which keeps the queue in the order the client sent.
        """
        request, before, turn = item
        try:
            try:
                spec: JobSpec | Exception = await self.gw.admit(request, context)
            except Exception as exc:
                spec = exc
            if before is not None:
                await before
            # Called now, so its script joins the batch behind the previous request's.
            queued = None if isinstance(spec, Exception) else asyncio.ensure_future(self._enqueue(spec, "resubmitted"))
        finally:
            if not turn.done():
                turn.set_result(None)
        try:
            if isinstance(spec, Exception):
                raise spec
            assert queued is not None
            record, created = await queued
        except Exception as exc:
            error = _reachable(exc)
            record_status(status_code(error))
            return pb.SubmitResult(error=to_rpc_status(error))
        return pb.SubmitResult(job=_reference(record, created))

    async def _queue(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext, *, again: str
    ) -> tuple[JobRecord, bool]:
        """Admits and queues a submit request: its job and whether this call created it (`again` is
        what the log line says when the job id already named a job)."""
        return await self._enqueue(await self.gw.admit(request, context), again)

    async def _enqueue(self, spec: JobSpec, again: str) -> tuple[JobRecord, bool]:
        """Queues an admitted job (its submit script joins the batch at once, on the first step)."""
        record, created = await self.gw.queue.submit(spec)
        log.info("job %s %s for model %s", spec.job_id, "accepted" if created else again, spec.model)
        return record, created

    async def Generate(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        try:
            with self.gw.stream_cap.hold(client_of(context)):
                record, created = await self._queue(request, context, again="rejoined")
                async for event in self.gw.follow(record.job_id, "0", fresh=created):
                    yield convert.event_to_pb(record.job_id, event)
        except BaseException as exc:
            await _abort(context, exc)

    async def Run(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.JobEvent:
        try:
            with self.gw.stream_cap.hold(client_of(context)):  # open as long as a stream: counted as one
                record, created = await self._queue(request, context, again="rejoined")
                # Closed at once on return: the stream's subscription ends now, not when it is collected.
                async with contextlib.aclosing(self.gw.follow(record.job_id, "0", fresh=created)) as events:
                    async for event in events:
                        if event.is_final:
                            return convert.event_to_pb(record.job_id, event)
        except BaseException as exc:
            await _abort(context, exc)
        raise AssertionError("follow() ends only after the final event")

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobEvent]:
        try:
            after = validate_event_id(request.after_event_id)
            if not request.job_id:
                raise InvalidArgument("job_id", "is empty; send the id of the job to watch")
            with self.gw.stream_cap.hold(client_of(context)):
                # An unknown job has no events: `follow` then ends with NOT_FOUND before yielding any.
                async for event in self.gw.follow(request.job_id, after):
                    yield convert.event_to_pb(request.job_id, event)
        except BaseException as exc:
            await _abort(context, exc)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        try:
            return convert.record_to_pb(await self.gw.queue.get(request.job_id))
        except BaseException as exc:
            await _abort(context, exc)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        try:
            record = await self.gw.queue.cancel(request.job_id)
        except BaseException as exc:
            await _abort(context, exc)
        log.info("job %s cancel requested", request.job_id)
        return convert.record_to_pb(record)

    async def GetTrace(self, request: pb.GetTraceRequest, context: grpc.aio.ServicerContext) -> pb.Trace:
        try:
            if not request.job_id:
                raise InvalidArgument("job_id", "is empty; send a job id or a trace id")
            spans = await self.gw.trace(request.job_id)
        except BaseException as exc:
            await _abort(context, exc)
        return pb.Trace(trace_id=spans[0].trace_id, spans=[convert.span_to_pb(s) for s in spans])

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        try:
            models = [convert.model_info_to_pb(await self.gw.model_info(name)) for name in self.gw.cards]
        except BaseException as exc:
            await _abort(context, exc)
        return pb.ListModelsResponse(models=models)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the call with the status `exc` maps to; re-raises what is not an error of the call."""
    if isinstance(exc, asyncio.CancelledError | grpc.aio.AbortError | GeneratorExit | KeyboardInterrupt):
        raise exc
    code, message, trailers = to_status(_reachable(exc))
    record_status(code)
    context.set_trailing_metadata(trailers)
    await context.abort(code, message)
    raise AssertionError("abort() returns only by raising")


def _reference(record: JobRecord, created: bool) -> pb.SubmitResponse:
    state = convert.state_to_pb(record.state)
    return pb.SubmitResponse(job_id=record.job_id, model=record.model, state=state, created=created)


def _reachable(exc: BaseException) -> BaseException:
    """The error to answer for `exc`: Redis being unreachable is UNAVAILABLE; a bug is logged."""
    if isinstance(exc, RedisError | ConnectionError):
        return ServiceUnavailable(f"Redis is unreachable ({type(exc).__name__}); retry shortly")
    if not isinstance(exc, BlockPressError):
        log.error("internal error in a gateway call", exc_info=exc)
    return exc
