"""Issue 17, items 5 and 6: what a client sends never gets UNKNOWN, INTERNAL or a false UNAVAILABLE,
and a Watch resumed at or past a job's final event ends. Real gateway on port 0, real redis-server.

- bytes that are no valid message (invalid UTF-8 in any string field, a corrupt wire format) on every
  Runtime method: INVALID_ARGUMENT naming the message type, nothing queued;
- JSON nested past the limit in a tool schema or a tool call's arguments (gRPC JSON text and the plain
  data the HTTP front sends): INVALID_ARGUMENT naming the field;
- a malformed `Watch.after_event_id`: INVALID_ARGUMENT naming `after_event_id`;
- Watch after the final event (its id, or any later id): the final event again, then the end.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.gateway.validation import validate_submit

LiveGateway = Any  # tests/faults/conftest.py: `live_gateway`

RUNTIME = pb.DESCRIPTOR.services_by_name["Runtime"]


def _bad_payloads(message: Any) -> list[bytes]:
    """Corrupt wire bytes, plus invalid UTF-8 in each top-level string field of `message`."""
    out = [b"\x0a\x05ab", b"\xff\xff\xff\xff"]
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING and not field.is_repeated:
            msg = message()
            setattr(msg, field.name, "zq")
            out.append(msg.SerializeToString().replace(b"zq", b"\xff\xfe"))
    return out


@pytest.mark.parametrize("method", [m.name for m in RUNTIME.methods])
async def test_undecodable_bytes_get_invalid_argument_on_every_method(live_gateway: LiveGateway, method: str) -> None:
    desc = RUNTIME.methods_by_name[method]
    path = f"/{RUNTIME.full_name}/{method}"
    call = live_gateway.channel.unary_stream(path) if desc.server_streaming else live_gateway.channel.unary_unary(path)
    for payload in _bad_payloads(getattr(pb, desc.input_type.name)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            reply = call(payload, timeout=5)
            if desc.server_streaming:
                async for _ in reply:
                    pass
            else:
                await reply
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (payload, info.value)
        assert desc.input_type.full_name in (info.value.details() or "")
    assert await live_gateway.queue.depth(live_gateway.model) == 0


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [65, 2_000, 100_000])
async def test_deep_json_gets_invalid_argument_naming_the_field(live_gateway: LiveGateway, depth: int) -> None:
    schema = pb.SubmitRequest(
        generation=pb.GenerationTask(
            messages=[pb.ChatMessage(role="user", content="hi")],
            tools=[pb.Tool(name="t", parameters_json=_nested(depth))],
        )
    )
    call = pb.ToolCall(name="t", arguments_json=_nested(depth))
    arguments = pb.SubmitRequest(
        agent=pb.AgentTask(
            messages=[
                pb.ChatMessage(role="user", content="hi"),
                pb.ChatMessage(role="assistant", content="", tool_calls=[call]),
            ]
        )
    )
    for request, field in [
        (schema, "generation.tools[0].parameters_json"),
        (arguments, "agent.messages[1].tool_calls[0].arguments_json"),
    ]:
        for send in (live_gateway.stub.Submit, lambda r: _drain(live_gateway.stub.Generate(r))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await send(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (info.value.details() or "").startswith(f"{field}: nests arrays and objects deeper than 64")


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def test_deep_json_as_plain_data_is_refused_with_its_path(gateway_card: Any) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5_000):
        node["a"] = node = {}
    raw = {
        "generation": {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "t", "parameters": deep}],
        }
    }
    with pytest.raises(InvalidArgument) as info:
        validate_submit(
            raw, settings=RuntimeSettings(), cards={gateway_card.name: gateway_card}, default_model=gateway_card.name
        )
    assert info.value.field == "generation.tools[0].parameters"


@pytest.mark.parametrize("after", ["abc", "-1", "+", "-", "$", "1-", "1-2-3", "1.5", " 1", "18446744073709551616-0"])
async def test_malformed_after_event_id_names_the_field(live_gateway: LiveGateway, after: str) -> None:
    await live_gateway.queue_job("w1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _drain(live_gateway.stub.Watch(pb.WatchRequest(job_id="w1", after_event_id=after), timeout=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("after_event_id:")


async def test_well_formed_event_ids_are_taken(live_gateway: LiveGateway) -> None:
    await live_gateway.queue_job("w2")
    await live_gateway.run_to_end()
    for after in ("", "0", "0-0", "1", "1-0"):
        events = [
            e async for e in live_gateway.stub.Watch(pb.WatchRequest(job_id="w2", after_event_id=after), timeout=5)
        ]
        assert events[-1].WhichOneof("event") == "completed"
        assert events[0].WhichOneof("event") == "queued"


async def test_watch_at_or_past_the_final_event_resends_it_and_ends(live_gateway: LiveGateway) -> None:
    await live_gateway.queue_job("w3")
    await live_gateway.run_to_end(canvases=2)
    events = [e async for e in live_gateway.stub.Watch(pb.WatchRequest(job_id="w3"), timeout=5)]
    final = events[-1]
    assert final.WhichOneof("event") == "completed"
    ms = int(final.id.split("-")[0])
    for after in (final.id, f"{ms}-999", f"{ms + 10_000_000}-0", "99999999999999"):
        start = time.monotonic()
        again = [
            e async for e in live_gateway.stub.Watch(pb.WatchRequest(job_id="w3", after_event_id=after), timeout=10)
        ]
        assert time.monotonic() - start < 2.0, "the stream ends at once, not at the deadline"
        assert [e.id for e in again] == [final.id]
    before_final = events[-2].id
    rest = [
        e async for e in live_gateway.stub.Watch(pb.WatchRequest(job_id="w3", after_event_id=before_final), timeout=5)
    ]
    assert [e.id for e in rest] == [final.id]


async def test_watch_of_an_unknown_job_is_not_found(live_gateway: LiveGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _drain(live_gateway.stub.Watch(pb.WatchRequest(job_id="nope"), timeout=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
