"""Issue 17, item 10: the gateway does not tokenize long prompts on its event loop. Real gateway on
port 0, real redis-server, the tiny checkpoint's tokenizer (about a second per 1 MB prompt).

While 8 prompts of 1 MB are being admitted at once, ListModels, health and a short Submit are still
answered promptly; before the fix the tokenizer held the loop and ListModels waited ~2 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blockpress.runtime._pb import runtime_pb2 as pb

LiveGateway = Any  # tests/faults/conftest.py: `live_gateway`

LONG_PROMPTS = 8
PROMPT = "hello world " * 83_333  # 999,996 characters, under the default max_prompt_chars of 1,000,000
BOUND_S = 0.5


async def _submit_long(stub: Any) -> grpc.StatusCode:
    request = pb.SubmitRequest(generation=pb.GenerationTask(prompt=PROMPT))
    try:
        await stub.Submit(request, timeout=120)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_other_calls_are_answered_while_long_prompts_are_tokenized(live_gateway: LiveGateway) -> None:
    gw = live_gateway
    health = health_pb2_grpc.HealthStub(gw.channel)
    await gw.stub.ListModels(pb.ListModelsRequest(), timeout=5)  # the channel is connected before timing
    start = time.monotonic()
    long_calls = [asyncio.create_task(_submit_long(gw.stub)) for _ in range(LONG_PROMPTS)]
    list_s: list[float] = []
    health_s: list[float] = []
    submit_s: list[float] = []
    while not all(call.done() for call in long_calls):
        t0 = time.monotonic()
        models = await gw.stub.ListModels(pb.ListModelsRequest(), timeout=30)
        t1 = time.monotonic()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        t2 = time.monotonic()
        submitted = await gw.stub.Submit(pb.SubmitRequest(generation=pb.GenerationTask(prompt="2+2=")), timeout=30)
        t3 = time.monotonic()
        assert [m.name for m in models.models] == [gw.model]
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert submitted.created
        list_s.append(t1 - t0)
        health_s.append(t2 - t1)
        submit_s.append(t3 - t2)
        await asyncio.sleep(0.05)
    took = time.monotonic() - start
    codes = [call.result() for call in long_calls]
    print(
        f"\n{LONG_PROMPTS} x 1 MB prompts admitted in {took:.2f} s; during them {len(list_s)} rounds: "
        f"ListModels max {max(list_s) * 1000:.1f} ms, health max {max(health_s) * 1000:.1f} ms, "
        f"short Submit max {max(submit_s) * 1000:.1f} ms"
    )
    # The tiny model's context is 4,096 tokens: each long prompt is counted in full and refused.
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * LONG_PROMPTS
    assert took > 1.0, "the long prompts were not tokenized at all; the test measures nothing"
    assert len(list_s) >= 3
    assert max(list_s) < BOUND_S
    assert max(health_s) < BOUND_S
    assert max(submit_s) < BOUND_S
