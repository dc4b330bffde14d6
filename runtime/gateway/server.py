"""The gRPC gateway: `blockpress.v1.Runtime` on grpc.aio, with health checking and reflection.

A call is validated (`validation.py`), checked against its model, then queued (`JobQueue.submit`);
streaming calls then follow the job's event stream in Redis until its final event. The gateway holds
no job state of its own, so a restarted gateway serves every job the old one accepted.

Health (`grpc.health.v1`) is SERVING only while Redis answers, at least one replica heartbeats, and
the gateway is not draining. On `stop()` (SIGTERM in `serve`/`gateway`) it turns NOT_SERVING, refuses
new jobs with UNAVAILABLE, and gives open calls `drain_s` to finish; queued jobs stay in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Collection, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import redis.asyncio as aioredis
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace
from redis.exceptions import RedisError

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import (
    InvalidArgument,
    ServiceUnavailable,
    TraceNotFound,
    Unauthenticated,
    to_status,
)
from blockpress.runtime.contracts.jobs import Event, JobRecord, JobSpec, JobState, new_job_id
from blockpress.runtime.gateway.validation import (
    ModelCard,
    build_spec,
    check_against_model,
    parse_submit,
    request_to_dict,
)
from blockpress.runtime.queue.jobqueue import JobQueue

if TYPE_CHECKING:
    from blockpress.runtime.tracing.store import SpanRecord, TraceStore

try:  # the traces engineer's module; the gateway serves without it
    from blockpress.runtime import telemetry as _telemetry
except ImportError:  # pragma: no cover - only in a partial install
    _telemetry = None  # type: ignore[assignment]

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Runtime"].full_name
_WATCH_BLOCK_MS = 2000
_METRICS_INTERVAL_S = 5.0


STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}


def event_to_pb(job_id: str, event: Event) -> pb.JobEvent:
    """A domain event as its proto; unknown payload keys (a newer writer) are ignored."""
    out = pb.JobEvent(id=event.id, job_id=job_id, time=event.ts)
    if event.type == "completed":
        completed_to_pb(event.data, out.completed)
    elif event.type in pb.JobEvent.DESCRIPTOR.fields_by_name:
        json_format.ParseDict(event.data, getattr(out, event.type), ignore_unknown_fields=True)
    return out


def completed_to_pb(data: Mapping[str, Any], out: pb.Completed) -> None:
    """Fills `out` from a `completed` payload. Tool calls carry `arguments` as a mapping while the proto
    has `arguments_json`: ParseDict with ignore_unknown_fields would drop them silently."""
    json_format.ParseDict({k: v for k, v in data.items() if k != "tool_calls"}, out, ignore_unknown_fields=True)
    for call in data.get("tool_calls") or ():
        out.tool_calls.add(name=call["name"], arguments_json=json.dumps(call.get("arguments") or {}))


def record_to_pb(record: JobRecord) -> pb.Job:
    job = pb.Job(
        job_id=record.job_id,
        model=record.model,
        kind=record.spec.kind,
        state=STATES[record.state],
        attempt=record.attempt,
        submitted_at=record.submitted_at,
        deadline=record.spec.deadline or 0.0,
        replica=record.replica or "",
        cancel_requested=record.cancel_requested,
        started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0,
    )
    if record.result is not None:
        completed_to_pb(record.result, job.result)
    if record.error is not None:
        json_format.ParseDict(record.error, job.error, ignore_unknown_fields=True)
    return job


def span_to_pb(record: SpanRecord) -> pb.Span:
    """A kept span as its proto; attributes and events travel as JSON, as their values are of any type."""
    events = [{"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes} for e in record.events]
    return pb.Span(
        trace_id=record.trace_id,
        span_id=record.span_id,
        parent_id=record.parent_id or "",
        name=record.name,
        start_ns=record.start_ns,
        end_ns=record.end_ns,
        service=record.service,
        kind=record.kind,
        status=record.status,
        status_message=record.status_message,
        attributes_json=json.dumps(record.attributes, separators=(",", ":"), default=str),
        events_json=json.dumps(events, separators=(",", ":"), default=str),
    )


# ---- interceptors -------------------------------------------------------------------------------------


def record_status(code: grpc.StatusCode) -> None:
    """Puts the call's status code on the gateway span (the interceptor cannot see an abort's code)."""
    if _telemetry is not None:
        trace.get_current_span().set_attribute(_telemetry.Attr.RPC_GRPC_STATUS_CODE, code.value[0])


def _wrap(handler: grpc.RpcMethodHandler, around: Any) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour run inside the async context manager `around(context)`."""
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    inner_us = handler.unary_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with around(context):
            async for item in inner_us(request, context):
                yield item

    return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """One span per call of `service`, `gateway.<Method>`, parented on the caller's W3C headers."""

    def __init__(self, service: str, tracer: trace.Tracer | None = None) -> None:
        self.prefix = f"/{service}/"
        self.tracer = tracer

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or _telemetry is None or not details.method.startswith(self.prefix):
            return handler
        telemetry = _telemetry
        method = details.method.removeprefix(self.prefix)
        # Only text headers can carry trace context; the authorization header is never copied anywhere.
        carrier = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str) and k != "authorization"}
        attributes = {
            telemetry.Attr.RPC_SYSTEM: "grpc",
            telemetry.Attr.RPC_SERVICE: self.prefix.strip("/"),
            telemetry.Attr.RPC_METHOD: method,
            telemetry.Attr.RPC_GRPC_STATUS_CODE: 0,
        }

        tracer = self.tracer or telemetry.get_tracer()
        name = telemetry.SpanName.gateway(method)
        parent = telemetry.extract_context(carrier)

        def start() -> tuple[trace.Span, Any]:
            span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
            return span, trace.set_span_in_context(span, parent)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                span, ctx = start()
                token = otel_context.attach(ctx)
                try:
                    return await inner_uu(request, context)
                finally:
                    otel_context.detach(token)
                    span.end()

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        inner_us = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            span, ctx = start()
            items = inner_us(request, context)
            try:
                while True:
                    # Current only while the servicer runs: gRPC may close a cancelled stream from
                    # another context, where a context token taken across a yield cannot be detached.
                    token = otel_context.attach(ctx)
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield item
            except asyncio.CancelledError:  # the client went away
                span.set_attribute(telemetry.Attr.RPC_GRPC_STATUS_CODE, grpc.StatusCode.CANCELLED.value[0])
                raise
            finally:
                await items.aclose()
                span.end()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` with one of `keys` on the calls of service `protected`.

    Health and reflection stay open: probes and grpcurl carry no keys, and they reveal no job data.
    """

    def __init__(self, keys: frozenset[str], *, protected: str) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self.prefix = f"/{protected}/"

    def _allowed(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value.removeprefix("Bearer ").strip().encode()
                # Compare against every key in constant time, so timing does not tell which prefix matched.
                return any([hmac.compare_digest(given, k) for k in self._keys])
        return False

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix) or self._allowed(details.invocation_metadata):
            return handler

        @contextlib.asynccontextmanager
        async def deny(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            code, message, trailers = to_status(
                Unauthenticated("authorization: send metadata 'authorization: Bearer <API key>' with a valid key")
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises

        return _wrap(handler, deny)


class _Servicer(pb_grpc.RuntimeServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        try:
            spec = await self.gw.admit(request, context)
            record, created = await self.gw.queue.submit(spec)
        except BaseException as exc:
            await _abort(context, exc)
        log.info("job %s %s for model %s", spec.job_id, "accepted" if created else "resubmitted", spec.model)
        return pb.SubmitResponse(job_id=record.job_id, model=record.model, state=STATES[record.state], created=created)

    async def Generate(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        try:
            spec = await self.gw.admit(request, context)
            record, created = await self.gw.queue.submit(spec)
            log.info("job %s %s for model %s", spec.job_id, "accepted" if created else "rejoined", spec.model)
            async for event in self.gw.follow(record.job_id, "0"):
                yield event_to_pb(record.job_id, event)
        except BaseException as exc:
            await _abort(context, exc)

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobEvent]:
        try:
            await self.gw.queue.get(request.job_id)  # NOT_FOUND before the stream starts
            async for event in self.gw.follow(request.job_id, request.after_event_id or "0"):
                yield event_to_pb(request.job_id, event)
        except BaseException as exc:
            await _abort(context, exc)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        try:
            return record_to_pb(await self.gw.queue.get(request.job_id))
        except BaseException as exc:
            await _abort(context, exc)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        try:
            record = await self.gw.queue.cancel(request.job_id)
        except BaseException as exc:
            await _abort(context, exc)
        log.info("job %s cancel requested", request.job_id)
        return record_to_pb(record)

    async def GetTrace(self, request: pb.GetTraceRequest, context: grpc.aio.ServicerContext) -> pb.Trace:
        try:
            if not request.job_id:
                raise InvalidArgument("job_id", "is empty; send a job id or a trace id")
            spans = await self.gw.trace(request.job_id)
        except BaseException as exc:
            await _abort(context, exc)
        return pb.Trace(trace_id=spans[0].trace_id, spans=[span_to_pb(s) for s in spans])

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        try:
            return pb.ListModelsResponse(models=[await self.gw.model_info(card) for card in self.gw.cards.values()])
        except BaseException as exc:
            await _abort(context, exc)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the call with the status `exc` maps to; re-raises what is not an error of the call."""
    if isinstance(exc, asyncio.CancelledError | grpc.aio.AbortError | GeneratorExit | KeyboardInterrupt):
        raise exc
    if isinstance(exc, RedisError | ConnectionError):
        exc = ServiceUnavailable(f"Redis is unreachable ({type(exc).__name__}); retry shortly")
    code, message, trailers = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error in a gateway call", exc_info=exc)
    record_status(code)
    context.set_trailing_metadata(trailers)
    await context.abort(code, message)
    raise AssertionError("abort() returns only by raising")


class Gateway:
    """The gRPC server and what it needs: the queue, the model cards, health and drain.

    Args:
        settings: host, port, limits, API keys, reflection, drain time.
        queue: the job queue; the gateway never closes its Redis client.
        cards: served models by name; the first is the default for requests that name none.
        tracer: where gateway spans go; default the global BlockPress tracer.
        trace_store: where `GetTrace` reads kept spans; default the store in `settings`' Redis, opened
            at the first `GetTrace`.
        agent_tools: the server-side tools the replicas offer, so that an agent task naming another is
            refused before it is queued; None leaves that check to the replica.
    """

    def __init__(
        self,
        settings: RuntimeSettings,
        queue: JobQueue,
        cards: Mapping[str, ModelCard],
        *,
        tracer: trace.Tracer | None = None,
        trace_store: TraceStore | None = None,
        agent_tools: Collection[str] | None = None,
    ) -> None:
        if not cards:
            raise ValueError("a gateway needs at least one model")
        self.settings = settings
        self.queue = queue
        self.cards = dict(cards)
        self.agent_tools = None if agent_tools is None else frozenset(agent_tools)
        self.default_model = next(iter(self.cards))
        self.draining = False
        self.port = 0
        self._live: dict[str, int] = {}
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.metrics_port: int | None = None
        """The port `/metrics` is served on, once started with `gateway_metrics_port` set."""
        self._metrics_server: Any = None
        self._sampler: asyncio.Task[None] | None = None
        self._sampler_stop = asyncio.Event()
        self._tracer = tracer
        self._traces = trace_store
        self._trace_client: Any = None  # the trace store's Redis client when the gateway opened it

    # ---- what the servicer uses ---------------------------------------------------------------------

    async def admit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> JobSpec:
        """Validates a submit request and turns it into the job to queue; raises the error to answer."""
        if self.draining:
            raise ServiceUnavailable("the gateway is draining; retry on another gateway")
        parsed = parse_submit(request_to_dict(request), self.settings, agent_tools=self.agent_tools)
        card = check_against_model(parsed, self.cards, self.default_model)
        if not self._live.get(card.name) and not await self._refresh_live(card.name):
            raise ServiceUnavailable(f"no replica of model {card.name!r} is live; retry shortly")
        remaining = context.time_remaining()
        trace_context = _telemetry.inject_context() if _telemetry is not None else {}
        return build_spec(
            parsed,
            job_id=parsed.job_id or new_job_id(),
            model=card.name,
            # A deadline on the call is the job's deadline: past it the client no longer waits.
            deadline=None if remaining is None else time.time() + remaining,
            trace_context=trace_context,
            default_max_turns=self.settings.agent_default_max_turns,
        )

    async def follow(self, job_id: str, after: str) -> AsyncIterator[Event]:
        """The job's events after `after` until its final one."""
        while True:
            events = await self.queue.read_events(job_id, after, block_ms=_WATCH_BLOCK_MS)
            for event in events:
                yield event
                after = event.id
                if event.is_final:
                    return
            if not events:
                await self.queue.get(job_id)  # a job dropped by retention ends the watch with NOT_FOUND

    async def trace(self, job_id: str) -> list[SpanRecord]:
        """The kept spans of a job's (or a trace id's) trace; raises `TraceNotFound` when none is kept."""
        if self._traces is None:
            import redis

            from blockpress.runtime.tracing.store import TraceStore

            url = self.settings.redis_url_or_default()
            self._trace_client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
            self._traces = TraceStore(self._trace_client)
        # The store's client is synchronous (it is the CLI's too); off the event loop, then.
        spans = await asyncio.to_thread(self._traces.get_trace, job_id)
        if not spans:
            raise TraceNotFound(job_id)
        return spans

    async def model_info(self, card: ModelCard) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=card.name,
            context_length=card.context_length,
            canvas_length=card.canvas_length,
            dtype=card.dtype,
            replicas_live=await self._refresh_live(card.name),
            queue_depth=await self.queue.depth(card.name),
            max_queue=self.queue.max_queue_per_model,
        )

    async def _refresh_live(self, model: str) -> int:
        live = await self.queue.live_replicas(model)
        self._live[model] = live
        return live

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> int:
        """Binds `host:port` and starts serving; returns the bound port (useful with port 0)."""
        interceptors: list[grpc.aio.ServerInterceptor] = [TracingInterceptor(SERVICE, self._tracer)]
        if self.settings.api_keys:
            interceptors.insert(0, AuthInterceptor(self.settings.api_key_values(), protected=SERVICE))
        limit = self.settings.max_request_bytes
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_RuntimeServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.settings.reflection:
            names = (
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await self._check_health()
        await server.start()
        self._server = server
        self._monitor = asyncio.create_task(self._watch_health(), name="gateway-health")
        if self.settings.gateway_metrics_port is not None:
            from blockpress.runtime.metrics import sample_queues, start_metrics_server

            self._metrics_server = start_metrics_server(self.settings.gateway_metrics_port, host=self.settings.host)
            self.metrics_port = int(self._metrics_server.server_port)
            sampler = sample_queues(
                self.queue, list(self.cards), stop=self._sampler_stop, interval_s=_METRICS_INTERVAL_S
            )
            self._sampler = asyncio.create_task(sampler, name="gateway-metrics")
        log.info("gateway listening on %s:%d serving %s", self.settings.host, self.port, ", ".join(self.cards))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING, no new jobs, open calls get `grace` seconds (default `drain_s`)."""
        self.draining = True
        await self._set_serving(False)
        if self._server is not None:
            await self._server.stop(self.settings.drain_s if grace is None else grace)
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._sampler is not None:
            self._sampler_stop.set()
            await self._sampler
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        if self._trace_client is not None:
            self._trace_client.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace=0)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self._health.set(name, status)

    async def _check_health(self) -> None:
        try:
            await self.queue.redis.ping()
            live = sum([await self._refresh_live(name) for name in self.cards])
        except (RedisError, OSError):
            live = -1
        await self._set_serving(live > 0 and not self.draining)

    async def _watch_health(self) -> None:
        while not self.draining:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._check_health()

    @classmethod
    def from_settings(
        cls, settings: RuntimeSettings, cards: Mapping[str, ModelCard], *, agent_tools: Collection[str] | None = None
    ) -> Gateway:
        """A gateway with its own Redis client and queue, as the CLI runs it."""
        client = aioredis.Redis.from_url(settings.redis_url_or_default())
        queue = JobQueue(
            client,
            max_queue_per_model=settings.max_queue,
            lease_s=settings.lease_s,
            max_deliveries=settings.max_deliveries,
        )
        return cls(settings, queue, cards, agent_tools=agent_tools)
