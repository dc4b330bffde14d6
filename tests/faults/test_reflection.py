"""Issue 17, item 10: server reflection answers under `grpc.reflection.v1` as well as `v1alpha`, as
grpcurl and current clients ask v1 first. Real gateway on port 0, a raw grpc client.

grpcio-reflection ships only the v1alpha messages; v1's are the same on the wire, so the v1 call is
built from them.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from blockpress.runtime.gateway.reflection import V1_SERVICE_NAME

LiveGateway = Any  # tests/faults/conftest.py: `live_gateway`


async def _ask(channel: grpc.aio.Channel, service: str, request: Any) -> Any:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = [reply async for reply in call(iter([request]), timeout=10)]
    assert len(replies) == 1
    return replies[0]


@pytest.mark.parametrize("service", [V1_SERVICE_NAME, "grpc.reflection.v1alpha.ServerReflection"])
async def test_reflection_lists_and_describes_the_runtime(live_gateway: LiveGateway, service: str) -> None:
    listed = await _ask(live_gateway.channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    print(f"\n{service} lists {sorted(names)}")
    assert {"blockpress.v1.Runtime", "grpc.health.v1.Health"} <= names
    found = await _ask(
        live_gateway.channel,
        service,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="blockpress.v1.Runtime"),
    )
    files = found.file_descriptor_response.file_descriptor_proto
    assert files, found
    assert any(b"blockpress/v1/runtime.proto" in f for f in files)


@pytest.mark.parametrize("gateway_settings", [{"reflection": False}])
async def test_reflection_off_serves_neither(live_gateway: LiveGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _ask(live_gateway.channel, V1_SERVICE_NAME, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
