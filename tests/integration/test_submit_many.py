"""SubmitMany and the SDK's `submit_many`: many jobs in one call, each answered as Submit would answer it.

Real grpc.aio gateway on port 0 over the real redis-server, no replicas (`test_gateway.GatewayThread`
keeps the model live with heartbeats): what is looked at is what gets queued, refused and traced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from test_gateway import GatewayThread, _flush, card, prompt_request  # noqa: F401 (card: a fixture)

from blockpress.runtime import AsyncClient, Client
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import (
    BlockPressError,
    InvalidArgument,
    ModelNotFound,
    QueueFull,
    Unauthenticated,
)
from blockpress.runtime.gateway.cards import ModelCard
from blockpress.runtime.gateway.servicer import MAX_SUBMIT_MANY


@pytest.fixture
def gw(redis_server: Any, card: ModelCard) -> Any:  # noqa: F811 (card is the imported fixture)
    _flush(redis_server.url)
    gateway = GatewayThread(redis_server.url, card, max_queue=5)
    gateway.beat()
    yield gateway
    gateway.close()


def test_each_request_gets_what_submit_would_answer_in_order(gw: GatewayThread) -> None:
    requests = [
        prompt_request("one", job_id="m-1"),
        prompt_request(""),  # refused: empty prompt
        prompt_request("two", job_id="m-2"),
        prompt_request("one", job_id="m-1"),  # the same request again: the same job, not created
        prompt_request("other", job_id="m-1"),  # the same id for another request: a conflict
        prompt_request("three", model="no-such-model"),
        *[prompt_request(f"fill {i}", job_id=f"m-fill-{i}") for i in range(5)],  # the queue holds 5
    ]
    reply = gw.stub.SubmitMany(pb.SubmitManyRequest(requests=requests), timeout=30)
    assert len(reply.results) == len(requests)
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds[:6] == ["job", "error", "job", "job", "error", "error"]
    one, empty, two, again, conflict, unknown = reply.results[:6]
    assert (one.job.job_id, one.job.created, two.job.job_id, two.job.created) == ("m-1", True, "m-2", True)
    assert (again.job.job_id, again.job.created) == ("m-1", False)
    assert empty.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert empty.error.message.startswith("generation.prompt: is empty")
    assert conflict.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert unknown.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    # Two were queued before the fill: three of the five fill jobs fit, the last two find the queue full.
    fill = reply.results[6:]
    assert [r.WhichOneof("result") for r in fill] == ["job", "job", "job", "error", "error"]
    assert {r.error.code for r in fill[3:]} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert gw.call(gw.queue.depth(gw.card.name)) == 5
    record = gw.call(gw.queue.get("m-2"))
    assert record.spec.prompt == "two" and record.spec.deadline is not None  # the call's deadline is the job's

    # One span per request, as a Submit of it would have: each job's trace starts at its own request.
    spans = [s for s in gw.exporter.get_finished_spans() if s.name == "gateway.SubmitMany"]
    assert len(spans) == len(requests)
    assert len({s.context.trace_id for s in spans}) == len(requests)
    codes = sorted(s.attributes["rpc.grpc.status_code"] for s in spans)
    assert codes.count(0) == 6 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]) == 2
    traced = {format(s.context.trace_id, "032x") for s in spans}
    assert record.spec.trace_context["traceparent"].split("-")[1] in traced


def test_a_call_over_the_limit_is_refused_whole(gw: GatewayThread) -> None:
    requests = [prompt_request(f"p{i}") for i in range(MAX_SUBMIT_MANY + 1)]
    with pytest.raises(grpc.RpcError) as info:
        gw.stub.SubmitMany(pb.SubmitManyRequest(requests=requests), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.details().startswith(f"requests: has {MAX_SUBMIT_MANY + 1}")  # type: ignore[attr-defined]
    assert gw.call(gw.queue.depth(gw.card.name)) == 0
    assert gw.stub.SubmitMany(pb.SubmitManyRequest(), timeout=30).results == []


def test_the_sdk_returns_handles_and_typed_errors_in_order(gw: GatewayThread) -> None:
    with Client(f"127.0.0.1:{gw.gateway.port}", timeout=30) as client:
        prompts: list[Any] = ["a", "", [{"role": "user", "content": "hi"}], "b", "c", "d", "e"]
        outcomes = client.submit_many(prompts, max_new_tokens=4)
        assert [type(o).__name__ for o in outcomes] == ["JobHandle", "InvalidArgument", *["JobHandle"] * 4, "QueueFull"]
        bad, full = outcomes[1], outcomes[-1]
        assert isinstance(bad, InvalidArgument) and bad.field == "generation.prompt"
        assert isinstance(full, QueueFull) and full.retry_after_s > 0
        handles = [o for o in outcomes if not isinstance(o, BlockPressError)]
        assert len({h.job_id for h in handles}) == 5
        assert all(h.status().name == "QUEUED" for h in handles)
        assert gw.call(gw.queue.get(handles[1].job_id)).spec.messages == [{"role": "user", "content": "hi"}]
        assert client.submit_many([]) == []
        with pytest.raises(InvalidArgument, match="job_id"):
            client.submit_many(["x"], job_id="mine")
        with pytest.raises(InvalidArgument, match="one prompt"):
            client.submit_many("a single prompt, not a list")
        with pytest.raises(InvalidArgument, match=r"prompts\[1\]: is one chat message"):
            client.submit_many(["x", {"role": "user", "content": "hi"}])
        [unknown] = client.submit_many(["x"], model="no-such-model")
        assert isinstance(unknown, ModelNotFound)


def test_the_sdk_spreads_many_prompts_over_calls_and_a_wrong_key_fails_each(
    redis_server: Any,
    card: ModelCard,  # noqa: F811
) -> None:
    _flush(redis_server.url)
    gw = GatewayThread(redis_server.url, card, max_queue=10_000, api_keys="k1")
    gw.beat()
    address = f"127.0.0.1:{gw.gateway.port}"

    async def main() -> None:
        async with AsyncClient(address, api_key="k1", timeout=60) as client:
            prompts = [f"job {i}" for i in range(523)]  # six calls of up to 100, four at a time
            outcomes = await client.submit_many(prompts, max_new_tokens=2)
            assert all(not isinstance(o, BlockPressError) for o in outcomes)
            records = await asyncio.gather(*[gw.queue.get(o.job_id) for o in outcomes[::50]])  # type: ignore[union-attr]
            assert [r.spec.prompt for r in records] == prompts[::50]  # in the order sent
        async with AsyncClient(address, api_key="wrong", timeout=10) as client:
            refused = await client.submit_many(["x", "y"])
            assert [type(o) for o in refused] == [Unauthenticated, Unauthenticated]

    try:
        asyncio.run_coroutine_threadsafe(main(), gw.loop).result(120)
        assert gw.call(gw.queue.depth(gw.card.name)) == 523
    finally:
        gw.close()


def test_against_a_gateway_without_submit_many_the_sdk_submits_one_by_one(gw: GatewayThread) -> None:
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{gw.gateway.port}", timeout=30) as client:
            # A real UNIMPLEMENTED: the gateway has no such method (as one older than SubmitMany).
            client._stub.SubmitMany = client._channel.unary_unary(
                "/blockpress.v1.Runtime/NoSuchMethod",
                request_serializer=pb.SubmitManyRequest.SerializeToString,
                response_deserializer=pb.SubmitManyResponse.FromString,
            )
            outcomes = await client.submit_many(["a", "", "b"], max_new_tokens=2)
            assert [type(o).__name__ for o in outcomes] == ["AsyncJobHandle", "InvalidArgument", "AsyncJobHandle"]

    asyncio.run_coroutine_threadsafe(main(), gw.loop).result(60)
    spans = {s.name for s in gw.exporter.get_finished_spans()}
    assert "gateway.Submit" in spans and "gateway.SubmitMany" not in spans
    assert gw.call(gw.queue.depth(gw.card.name)) == 2
