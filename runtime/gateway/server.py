"""The gRPC gateway's lifecycle: `blockpress.v1.Runtime` on grpc.aio, with health checking and reflection.

A call (`servicer.py`) is validated against its model (`validation.validate_submit`), then queued;
streaming calls then follow the job's event stream in Redis until its final event. The gateway holds
no job state of its own, so a restarted gateway serves every job the old one accepted.

Health (`grpc.health.v1`) is SERVING only while Redis answers, at least one replica heartbeats, and
the gateway is not draining. On `stop()` (SIGTERM in `serve`/`gateway`) it turns NOT_SERVING, refuses
new jobs with UNAVAILABLE, and gives open calls `drain_s` to finish; queued jobs stay in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from redis.exceptions import RedisError

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import ConfigurationError, ServiceUnavailable, TraceNotFound
from blockpress.runtime.contracts.jobs import Event, JobSpec
from blockpress.runtime.convert import request_to_dict
from blockpress.runtime.gateway.cards import ModelCard
from blockpress.runtime.gateway.fanout import EventFanout
from blockpress.runtime.gateway.handlers import add_runtime_to_server
from blockpress.runtime.gateway.reflection import enable_reflection
from blockpress.runtime.gateway.servicer import RuntimeServicer
from blockpress.runtime.gateway.streamcap import StreamCap
from blockpress.runtime.gateway.validation import validate_submit
from blockpress.runtime.queue.jobqueue import JobQueue
from blockpress.runtime.sdk.records import ModelInfo
from blockpress.runtime.tracing.telemetry import inject_context

if TYPE_CHECKING:
    from blockpress.runtime.tracing.store import SpanRecord, TraceStore

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Runtime"].full_name
_METRICS_INTERVAL_S = 5.0
_INLINE_TEXT = 4096
"""Request text (characters) up to which admission validates on the event loop: tokenizing this much
costs at most ~4 ms, while the hop to a thread costs ~0.1 ms against ~0.03 ms for a whole small
validation, so the common short submit stays inline and only a long one moves to a thread."""
_ADMISSION_THREADS = 4
"""Threads counting long prompts; their own pool, so a burst of them cannot hold up the loop's
default executor (DNS lookups of new Redis connections, `GetTrace`)."""


def _text_size(raw: Mapping[str, Any]) -> int:
    """Characters (or bytes) of every string in a request as plain data, counted up to `_INLINE_TEXT`."""
    total, stack = 0, [raw]
    while stack and total <= _INLINE_TEXT:  # iterative: a client's nesting cannot reach a recursion limit
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


def _server_credentials(settings: RuntimeSettings) -> grpc.ServerCredentials:
    """The gRPC port's TLS credentials from `tls_cert_file` and `tls_key_file`."""
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None  # both, or neither
    try:
        pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"tls_cert_file / tls_key_file: cannot read {exc.filename} ({exc.strerror})") from None
    return grpc.ssl_server_credentials([pair])


def _with_seed(spec: JobSpec) -> JobSpec:
    """`spec` with a seed derived from its job id when the client gave none.

    A job is delivered again when its replica dies; with the same seed the re-run writes the same
    canvases, so the SDK can drop the ones the client already has (`sdk/replay.py`).
    """
    if spec.settings.get("seed") is not None:
        return spec
    seed = int.from_bytes(hashlib.sha256(spec.job_id.encode()).digest()[:7], "little")
    return dataclasses.replace(spec, settings={**spec.settings, "seed": seed})


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
        self.fanout = EventFanout(queue)
        """Every open stream's events, read over one Redis connection (`fanout.py`)."""
        self.stream_cap = StreamCap(settings.max_streams_per_client)
        self._health = health.aio.HealthServicer()
        self._admission = ThreadPoolExecutor(_ADMISSION_THREADS, thread_name_prefix="admission")
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
        self.http_port: int | None = None
        """The port the HTTP API is served on, once started with `http_port` set."""
        self._http: Any = None

    # ---- what the servicer uses ---------------------------------------------------------------------

    async def admit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> JobSpec:
        """Validates a submit request and turns it into the job to queue; raises the error to answer."""
        remaining = context.time_remaining()
        # A deadline on the call is the job's deadline: past it the client no longer waits.
        return await self.admit_data(
            request_to_dict(request), deadline=None if remaining is None else time.time() + remaining
        )

    async def admit_data(self, raw: Mapping[str, Any], *, deadline: float | None = None) -> JobSpec:
        """`admit` for a request as plain data (`validate_submit`'s input), as the HTTP front sends it."""
        if self.draining:
            raise ServiceUnavailable("the gateway is draining; retry on another gateway")
        validate = functools.partial(
            validate_submit,
            raw,
            settings=self.settings,
            cards=self.cards,
            default_model=self.default_model,
            deadline=deadline,
            trace_context=inject_context(),
            agent_tools=self.agent_tools,
        )
        if _text_size(raw) <= _INLINE_TEXT:
            spec = validate()
        else:  # may tokenize for a second: in a thread, so other calls are answered meanwhile
            spec = await asyncio.get_running_loop().run_in_executor(self._admission, validate)
        if not self._live.get(spec.model) and not await self._refresh_live(spec.model):
            raise ServiceUnavailable(f"no replica of model {spec.model!r} is live; retry shortly")
        return _with_seed(spec)

    def follow(self, job_id: str, after: str, *, fresh: bool = False) -> AsyncGenerator[Event]:
        """The job's events after `after` until its final one (re-sent when `after` is at or past it);
        `fresh` when the caller has just created the job (`EventFanout.follow`)."""
        return self.fanout.follow(job_id, after, fresh=fresh)

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

    async def model_info(self, name: str) -> ModelInfo:
        """A served model's limits, live replicas and queue depth right now."""
        card = self.cards[name]
        return ModelInfo(
            name=card.name,
            context_length=card.context_length,
            canvas_length=card.canvas_length,
            dtype=card.precision,
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
        limit = self.settings.max_request_bytes
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
        keys = self.settings.api_key_values() if self.settings.api_keys else ()
        add_runtime_to_server(RuntimeServicer(self), server, tracer=self._tracer, api_keys=keys)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.settings.reflection:
            enable_reflection((SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
        address = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls_cert_file is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, _server_credentials(self.settings))
        await self._check_health()
        await self.fanout.start()
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
        if self.settings.http_port is not None:
            # Imported here: a gateway without the HTTP front (and the SDK) never loads the ASGI stack.
            from blockpress.runtime.http.server import HttpServer

            self._http = HttpServer(self, host=self.settings.host, port=self.settings.http_port, tracer=self._tracer)
            self.http_port = await self._http.start()
        log.info("gateway listening on %s:%d serving %s", self.settings.host, self.port, ", ".join(self.cards))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING, no new jobs, open calls get `grace` seconds (default `drain_s`)."""
        self.draining = True
        await self._set_serving(False)
        grace = self.settings.drain_s if grace is None else grace
        # Both fronts drain at once, within the one grace period.
        await asyncio.gather(*(front.stop(grace) for front in (self._http, self._server) if front is not None))
        await self.fanout.stop()
        self._admission.shutdown(wait=False, cancel_futures=True)
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
        # Blocking: a burst of calls past the pool's connections waits for one instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url_or_default(), timeout=10)
        client = aioredis.Redis.from_pool(pool)
        queue = JobQueue(
            client,
            max_queue_per_model=settings.max_queue,
            lease_s=settings.lease_s,
            max_deliveries=settings.max_deliveries,
        )
        return cls(settings, queue, cards, agent_tools=agent_tools)
