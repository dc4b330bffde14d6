"""The gateway on a real grpc.aio server (port 0) over a real redis-server, without replicas.

A replica's heartbeat is written with the queue's own `beat`, so the gateway admits jobs that nobody
runs: what these tests look at is what the gateway accepts, refuses and reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.keys import Keys
from blockpress.runtime.gateway.cards import ModelCard, load_model_card
from blockpress.runtime.gateway.server import Gateway
from blockpress.runtime.queue.jobqueue import JobQueue


class GatewayThread:
    """A gateway running in its own thread and event loop, so blocking clients can call it."""

    def __init__(self, redis_url: str, card: ModelCard, **overrides: Any) -> None:
        self.redis_url = redis_url
        self.card = card
        self.settings = RuntimeSettings(port=0, health_interval_s=0.1, **overrides)
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._beating: concurrent.futures.Future[None] | None = None
        self.call(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.gateway.port}")
        self.stub = pb_grpc.RuntimeStub(self.channel)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.redis = aioredis.Redis.from_url(self.redis_url)
        self.queue = JobQueue(self.redis, max_queue_per_model=self.settings.max_queue)
        self.gateway = Gateway(self.settings, self.queue, {self.card.name: self.card}, tracer=self.tracer)
        await self.gateway.start()

    def beat(self) -> None:
        """A replica of the model is live from now on: it heartbeats, as a real replica's loop does,
        so that a test running longer than the gateway's live window still sees it."""
        self.call(self.queue.beat(self.card.name, "test-replica"))
        if self._beating is None:
            self._beating = asyncio.run_coroutine_threadsafe(self._keep_beating(), self.loop)

    async def _keep_beating(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(Exception):  # a test may stop Redis on purpose
                await self.queue.beat(self.card.name, "test-replica")

    def job_keys(self) -> list[bytes]:
        return [*self.call(self.redis.keys("{bp}:job:*")), *self.call(self.redis.keys("{bp}:events:*"))]

    def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        self.channel.close()
        self.call(self.gateway.stop(grace=0))
        self.call(self.redis.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def card(tiny_checkpoint: Path) -> ModelCard:
    return load_model_card(str(tiny_checkpoint))


def _flush(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()


@pytest.fixture
def gw(redis_server: Any, card: ModelCard) -> Iterator[GatewayThread]:
    _flush(redis_server.url)
    gateway = GatewayThread(redis_server.url, card, max_queue=4, max_prompt_chars=20_000)
    gateway.beat()
    yield gateway
    gateway.close()


def prompt_request(prompt: str = "hello", **fields: Any) -> pb.SubmitRequest:
    return pb.SubmitRequest(generation=pb.GenerationTask(prompt=prompt), **fields)


def code_of(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


BAD = [
    (pb.SubmitRequest(), grpc.StatusCode.INVALID_ARGUMENT, "task"),
    (prompt_request(""), grpc.StatusCode.INVALID_ARGUMENT, "generation.prompt: is empty"),
    (prompt_request("x" * 20_001), grpc.StatusCode.INVALID_ARGUMENT, "generation.prompt: is 20001 characters"),
    (prompt_request("x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "context of 4096 tokens"),
    (
        pb.SubmitRequest(generation=pb.GenerationTask(prompt="hi", settings=pb.Settings(entropy_bound=0))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "generation.settings.entropy_bound: must be greater than 0",
    ),
    (prompt_request(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model: unknown model 'no-such-model'"),
    (prompt_request(job_id="not ok!"), grpc.StatusCode.INVALID_ARGUMENT, "job_id:"),
]


@pytest.mark.parametrize(("request_", "code", "message"), BAD)
def test_bad_input_gets_its_code_and_nothing_is_queued(
    gw: GatewayThread, request_: pb.SubmitRequest, code: grpc.StatusCode, message: str
) -> None:
    for method in (gw.stub.Submit, lambda r: list(gw.stub.Generate(r))):
        with pytest.raises(grpc.RpcError) as info:
            method(request_)
        assert info.value.code() == code  # type: ignore[attr-defined]
        assert message in info.value.details()  # type: ignore[attr-defined]
    assert gw.job_keys() == []
    assert gw.call(gw.queue.depth(gw.card.name)) == 0


def test_a_good_submit_is_queued_with_its_trace(gw: GatewayThread) -> None:
    reply = gw.stub.Submit(prompt_request(job_id="good-1"), timeout=30)
    assert (reply.job_id, reply.state, reply.created) == ("good-1", pb.JOB_STATE_QUEUED, True)
    record = gw.call(gw.queue.get("good-1"))
    assert record.spec.prompt == "hello" and record.model == gw.card.name
    # A deadline on the call is the job's deadline. (gRPC rounds the timeout it sends up to its
    # header's coarser units, up to 100 ms at this size, so the server may see a little more than 30 s.)
    assert record.spec.deadline is not None and 20 < record.spec.deadline - record.spec.submitted_at <= 30.2
    spans = [s for s in gw.exporter.get_finished_spans() if s.name == "gateway.Submit"]
    assert len(spans) == 1
    assert spans[0].attributes["rpc.method"] == "Submit"
    trace_id = format(spans[0].context.trace_id, "032x")
    assert trace_id in record.spec.trace_context["traceparent"]


def test_a_generate_stream_closed_early_ends_its_span_cleanly(
    gw: GatewayThread, caplog: pytest.LogCaptureFixture
) -> None:
    # The client is a process of its own that reads the first event and exits without closing its call.
    # (A cancel from a client in this process sometimes never reached the server: about 1 run in 8.)
    script = (
        "import sys, grpc\n"
        "from blockpress.runtime._pb import runtime_pb2 as pb, runtime_pb2_grpc as pb_grpc\n"
        "stub = pb_grpc.RuntimeStub(grpc.insecure_channel(sys.argv[1]))\n"
        "call = stub.Generate(pb.SubmitRequest(job_id='early-1', generation=pb.GenerationTask(prompt='hello')))\n"
        "first = next(call)\n"
        "print(first.WhichOneof('event'), first.job_id, flush=True)\n"
        "import os; os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, f"127.0.0.1:{gw.gateway.port}"], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.split() == ["queued", "early-1"], out.stderr
    for _ in range(150):
        spans = [s for s in gw.exporter.get_finished_spans() if s.name == "gateway.Generate"]
        if spans:
            break
        gw.call(asyncio.sleep(0.1))
    assert len(spans) == 1
    assert spans[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert gw.call(gw.queue.get("early-1")).state.value == "QUEUED"  # closing the call does not cancel the job


def test_same_job_id_twice_is_one_job(gw: GatewayThread) -> None:
    first = gw.stub.Submit(prompt_request(job_id="idem-1"))
    second = gw.stub.Submit(prompt_request(job_id="idem-1"))  # a retry of the same request
    assert first.created and not second.created
    assert second.job_id == "idem-1"
    # The same id with another request is refused, not silently answered with the first job.
    with pytest.raises(grpc.RpcError) as info:
        gw.stub.Submit(prompt_request("different text", job_id="idem-1"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    assert gw.call(gw.queue.depth(gw.card.name)) == 1
    assert gw.call(gw.queue.get("idem-1")).spec.prompt == "hello"


def test_full_queue_gets_resource_exhausted_with_a_retry_hint(gw: GatewayThread) -> None:
    for i in range(4):
        gw.stub.Submit(prompt_request(job_id=f"fill-{i}"))
    with pytest.raises(grpc.RpcError) as info:
        gw.stub.Submit(prompt_request(job_id="one-too-many"))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.trailing_metadata())
    assert int(trailers["retry-after-ms"]) > 0
    assert f"retry after {trailers['retry-after-ms']} ms" in err.details()
    assert gw.call(gw.queue.depth(gw.card.name)) == 4
    with pytest.raises(Exception, match="no job"):
        gw.call(gw.queue.get("one-too-many"))


def test_cancel_and_watch(gw: GatewayThread) -> None:
    gw.stub.Submit(prompt_request(job_id="c-1"))
    job = gw.stub.Cancel(pb.CancelRequest(job_id="c-1"))
    assert job.state == pb.JOB_STATE_CANCELLED
    events = list(gw.stub.Watch(pb.WatchRequest(job_id="c-1"), timeout=10))
    assert [e.WhichOneof("event") for e in events] == ["queued", "cancelled"]
    # Resuming after the first event gives exactly the rest.
    rest = list(gw.stub.Watch(pb.WatchRequest(job_id="c-1", after_event_id=events[0].id), timeout=10))
    assert [e.id for e in rest] == [events[1].id]
    assert code_of(lambda: gw.stub.Cancel(pb.CancelRequest(job_id="c-1"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: gw.stub.Cancel(pb.CancelRequest(job_id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: gw.stub.GetJob(pb.GetJobRequest(job_id="nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(gw.stub.Watch(pb.WatchRequest(job_id="nope")))) == grpc.StatusCode.NOT_FOUND


def test_list_models_reports_limits_and_replicas(gw: GatewayThread) -> None:
    gw.stub.Submit(prompt_request())
    (model,) = gw.stub.ListModels(pb.ListModelsRequest()).models
    assert model.name == gw.card.name
    assert (model.context_length, model.canvas_length) == (4096, 32)
    assert model.dtype == "float32"
    assert (model.replicas_live, model.queue_depth, model.max_queue) == (1, 1, 4)


def test_health_follows_replicas_and_drain(redis_server: Any, card: ModelCard) -> None:
    _flush(redis_server.url)
    gw = GatewayThread(redis_server.url, card)
    try:
        health = health_pb2_grpc.HealthStub(gw.channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service="blockpress.v1.Runtime")).status

        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING  # no replica yet
        assert code_of(lambda: gw.stub.Submit(prompt_request())) == grpc.StatusCode.UNAVAILABLE
        gw.beat()
        gw.call(asyncio.sleep(0.4))
        assert status() == health_pb2.HealthCheckResponse.SERVING
        gw.call(gw.gateway.stop(grace=0.5))
        assert gw.gateway.draining
    finally:
        gw.close()


def test_reflection_lists_the_service(gw: GatewayThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"blockpress.v1.Runtime", "grpc.health.v1.Health"} <= names


def test_api_keys(redis_server: Any, card: ModelCard, caplog: pytest.LogCaptureFixture) -> None:
    _flush(redis_server.url)
    caplog.set_level(logging.DEBUG)
    gw = GatewayThread(redis_server.url, card, api_keys="s3cret-key,other-key")
    gw.beat()
    try:
        submit = gw.stub.Submit
        assert code_of(lambda: submit(prompt_request())) == grpc.StatusCode.UNAUTHENTICATED
        bad = (("authorization", "Bearer wrong"),)
        assert code_of(lambda: submit(prompt_request(), metadata=bad)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: list(gw.stub.Generate(prompt_request(), metadata=bad))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        good = (("authorization", "Bearer s3cret-key"),)
        assert submit(prompt_request(job_id="auth-1"), metadata=good).created
        assert sorted(gw.job_keys()) == [b"{bp}:events:auth-1", b"{bp}:job:auth-1"]  # refused calls queued nothing
        health = health_pb2_grpc.HealthStub(gw.channel)
        health.Check(health_pb2.HealthCheckRequest())  # probes carry no key
    finally:
        gw.close()
    assert "s3cret" not in caplog.text
    for span in gw.exporter.get_finished_spans():
        assert "s3cret" not in str(dict(span.attributes or {}))


def test_deadline_passes_while_queued_ends_expired(gw: GatewayThread) -> None:
    gw.stub.Submit(prompt_request(job_id="late-1"), timeout=0.3)
    gw.call(asyncio.sleep(0.5))
    # A replica taking the job after its deadline settles it EXPIRED instead of running it.
    assert gw.call(gw.queue.claim(gw.card.name, "test-replica", block_ms=200)) is None
    events = list(gw.stub.Watch(pb.WatchRequest(job_id="late-1"), timeout=10))
    assert events[-1].WhichOneof("event") == "expired"
    assert gw.stub.GetJob(pb.GetJobRequest(job_id="late-1")).state == pb.JOB_STATE_EXPIRED


# ---- fuzzing ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_gw(redis_server: Any, card: ModelCard) -> Iterator[GatewayThread]:
    gateway = GatewayThread(redis_server.url, card, max_queue=100_000, max_prompt_chars=3000, max_messages=8)
    gateway.beat()
    yield gateway
    gateway.close()


_text = st.text(st.characters(codec="utf-8"), max_size=40)
# No subnormals: an engine built earlier in this process flushes denormals to zero (DiffusionEngine on the
# CPU), and hypothesis refuses to draw them under that processor state.
_floats = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False) | st.sampled_from(
    [0.0, -1.0, 1e-9, 0.5, 2.0]
)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(-5, 5000)
_settings = st.builds(
    pb.Settings,
    max_new_tokens=st.none() | _ints,
    max_denoising_steps=st.none() | _ints,
    t_min=st.none() | _floats,
    t_max=st.none() | _floats,
    entropy_bound=st.none() | _floats,
    stability_threshold=st.none() | _ints,
    confidence_threshold=st.none() | _floats,
    seed=st.none() | _ints,
    stop_token_ids=st.lists(st.integers(-3, 600), max_size=3),
)
_message = st.builds(
    pb.ChatMessage,
    role=st.sampled_from(["user", "system", "assistant", "tool", "", "robot"]),
    content=_text,
    name=st.sampled_from(["", "calc", "x y"]),
)
_tool = st.builds(pb.Tool, name=st.sampled_from(["calc", "", "1x", "a" * 70]), parameters_json=_text | st.just("{}"))
_generation = st.builds(
    pb.GenerationTask,
    prompt=_text | st.text(max_size=3500) | st.just(""),
    messages=st.lists(_message, max_size=10),
    settings=_settings,
    tools=st.lists(_tool, max_size=2),
    session_id=st.sampled_from(["", "s-1", "bad id"]),
)
_FRESH = "<fresh>"
_request = st.builds(
    pb.SubmitRequest,
    model=st.sampled_from(["", "tiny", "other"]),
    # FRESH becomes a new uuid per example: hypothesis may draw the same value in two examples, and a
    # refused example would then find the job an earlier accepted one stored under that id.
    job_id=st.sampled_from(["", "bad id", "x" * 200, _FRESH]),
    generation=_generation,
)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_request)
def test_fuzzed_requests_get_a_client_code_and_refusals_queue_nothing(
    fuzz_gw: GatewayThread, request: pb.SubmitRequest
) -> None:
    if request.job_id == _FRESH:
        request.job_id = uuid.uuid4().hex
    job_id = request.job_id or None
    before = gw_depth = fuzz_gw.call(fuzz_gw.queue.depth(fuzz_gw.card.name))
    try:
        reply = fuzz_gw.stub.Submit(request, timeout=30)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc
        assert ":" in exc.details()  # type: ignore[attr-defined]  # "field: reason"
        assert fuzz_gw.call(fuzz_gw.queue.depth(fuzz_gw.card.name)) == before
        if job_id and code is grpc.StatusCode.INVALID_ARGUMENT and "job_id" not in exc.details():  # type: ignore[attr-defined]
            assert fuzz_gw.call(fuzz_gw.redis.exists(Keys().job(job_id))) == 0
        return
    # Accepted: it must have been a request the engine can run.
    record = fuzz_gw.call(fuzz_gw.queue.get(reply.job_id))
    assert record.spec.model == fuzz_gw.card.name
    assert (record.spec.prompt or "").strip() or record.spec.messages
    assert reply.created  # every accepted example carries a job id no earlier example used
    assert fuzz_gw.call(fuzz_gw.queue.depth(fuzz_gw.card.name)) == gw_depth + 1


def test_fuzzed_single_bad_field_is_named(fuzz_gw: GatewayThread) -> None:
    """One bad value in an otherwise good request: INVALID_ARGUMENT naming exactly that field."""
    cases = {
        "generation.settings.max_new_tokens": pb.Settings(max_new_tokens=-1),
        "generation.settings.max_denoising_steps": pb.Settings(max_denoising_steps=0),
        "generation.settings.t_min": pb.Settings(t_min=float("inf")),
        "generation.settings.entropy_bound": pb.Settings(entropy_bound=-0.5),
        "generation.settings.stability_threshold": pb.Settings(stability_threshold=65),
        "generation.settings.confidence_threshold": pb.Settings(confidence_threshold=-1),
        "generation.settings.seed": pb.Settings(seed=-(2**63)),
    }
    for field, bad in cases.items():
        request = pb.SubmitRequest(job_id=uuid.uuid4().hex, generation=pb.GenerationTask(prompt="hi", settings=bad))
        with pytest.raises(grpc.RpcError) as info:
            fuzz_gw.stub.Submit(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert info.value.details().startswith(f"{field}:")  # type: ignore[attr-defined]
        assert fuzz_gw.call(fuzz_gw.redis.exists(Keys().job(request.job_id))) == 0
