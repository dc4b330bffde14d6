"""Issue 17, item 10: a job id is an idempotency key for one request, never a way to reach another job.

Real gateway on port 0 over the session's redis-server: the same request resubmitted under its id
(with another deadline and trace) rejoins the first job; another request under that id is refused
with ALREADY_EXISTS naming `job_id`, and nothing of the first job changes.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import JobIdConflict
from blockpress.runtime.sdk.aio import AsyncClient

LiveGateway = Any  # tests/faults/conftest.py: `live_gateway`


def _request(prompt: str, **settings: Any) -> pb.SubmitRequest:
    return pb.SubmitRequest(
        job_id="idem-1", generation=pb.GenerationTask(prompt=prompt, settings=pb.Settings(**settings))
    )


async def test_the_same_request_rejoins_and_another_request_is_already_exists(live_gateway: LiveGateway) -> None:
    gw = live_gateway
    first = await gw.stub.Submit(_request("hello", max_new_tokens=8), timeout=5)
    assert first.created
    again = await gw.stub.Submit(_request("hello", max_new_tokens=8), timeout=30)  # another deadline
    assert (again.job_id, again.created) == ("idem-1", False)
    for other in (_request("hello!", max_new_tokens=8), _request("hello", max_new_tokens=9), _request("hello")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Submit(other, timeout=5)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "idem-1" in (info.value.details() or "") and (info.value.details() or "").startswith("job_id:")
    record = await gw.queue.get("idem-1")
    assert record.spec.prompt == "hello" and record.spec.settings["max_new_tokens"] == 8
    assert await gw.queue.depth(gw.model) == 1


async def test_the_sdk_raises_job_id_conflict_and_a_stream_is_refused_too(live_gateway: LiveGateway) -> None:
    gw = live_gateway
    async with AsyncClient(gw.address) as sdk:
        handle = await sdk.submit("one request", job_id="idem-2", max_new_tokens=8)
        assert (await sdk.submit("one request", job_id="idem-2", max_new_tokens=8)).job_id == handle.job_id
        with pytest.raises(JobIdConflict) as info:
            await sdk.submit("another request", job_id="idem-2", max_new_tokens=8)
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS and "idem-2" in info.value.message
        with pytest.raises(JobIdConflict):
            async for _ in sdk.stream("another request", job_id="idem-2"):
                pass


async def test_errors_carry_the_standard_rich_status_a_generic_client_decodes(live_gateway: LiveGateway) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    gw = live_gateway
    await gw.stub.Submit(_request("hello"), timeout=5)
    cases = [
        (_request("hello!"), grpc.StatusCode.ALREADY_EXISTS),
        (pb.SubmitRequest(generation=pb.GenerationTask(prompt="")), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Submit(request, timeout=5)
        assert info.value.code() == code
        status = rpc_status.from_call(info.value)  # checks code and message agree with the call's
        assert status is not None and status.code == code.value[0] and status.message == info.value.details()
        found = {}
        for detail in status.details:
            for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
                message = kind()
                if detail.Unpack(message):
                    found[kind.__name__] = message
        assert found["ErrorInfo"].domain == "blockpress"
        if code == grpc.StatusCode.ALREADY_EXISTS:
            assert found["ErrorInfo"].reason == "JOB_ID_CONFLICT"
        else:
            [violation] = found["BadRequest"].field_violations
            assert violation.field.endswith("prompt") and violation.description
    # RetryInfo: past the stream cap a stream is RESOURCE_EXHAUSTED with the delay to wait.
    gw.gateway.stream_cap.per_client = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in gw.stub.Watch(pb.WatchRequest(job_id="idem-1"), timeout=5):
            pass
    status = rpc_status.from_call(info.value)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details) and retry.retry_delay.ToMilliseconds() == 1000
