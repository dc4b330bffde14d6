"""The typed event payloads agree with the proto field for field, and survive the Redis serializer."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf.descriptor import FieldDescriptor

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts import events
from blockpress.runtime.contracts.jobs import dumps, loads

# Where the domain and the wire differ on purpose (see the module docstring of contracts.events).
_DOMAIN_ONLY = {("Completed", "turns")}
_RENAMED = {("ToolCall", "arguments"): "arguments_json"}
_PROTO_NAMES = {"ErrorInfo": "Error"}

_SCALARS = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_DOUBLE: float,
}


def _classes() -> list[type]:
    seen: dict[str, type] = {}
    for cls in events.PAYLOADS.values():
        seen[cls.__name__] = cls
    for extra in (events.Usage, events.Timings, events.ToolCall, events.ErrorInfo):
        seen[extra.__name__] = extra
    return list(seen.values())


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_each_payload_class_matches_its_proto_message(cls: type) -> None:
    message = getattr(pb, _PROTO_NAMES.get(cls.__name__, cls.__name__)).DESCRIPTOR
    ours = {
        _RENAMED.get((cls.__name__, f.name), f.name)
        for f in dataclasses.fields(cls)
        if (cls.__name__, f.name) not in _DOMAIN_ONLY
    }
    assert ours == set(message.fields_by_name), f"{cls.__name__} and pb.{message.name} differ"
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    renamed = {wire for (owner, _), wire in _RENAMED.items() if owner == cls.__name__}
    for name, fd in message.fields_by_name.items():
        if fd.type in _SCALARS and name not in renamed:
            assert _SCALARS[fd.type].__name__ in str(hints[name]), f"{cls.__name__}.{name}: {hints[name]}"


def test_every_event_type_has_a_payload_and_a_proto_field() -> None:
    assert set(events.PAYLOADS) == {f.name for f in pb.JobEvent.DESCRIPTOR.oneofs_by_name["event"].fields}


def test_a_payload_survives_the_serializer_with_its_types() -> None:
    done = events.Completed(
        text="hi",
        token_ids=(1, 2),
        stop_reason="tool_call",
        usage=events.Usage(prompt_tokens=5, completion_tokens=2, prefilled_tokens=5),
        timings=events.Timings(total_s=0.25),
        canvases=1,
        tool_calls=(events.ToolCall(name="calculator", arguments={"expression": "1+1"}),),
    )
    kind, data = events.to_data(done)
    assert kind == "completed"
    assert events.from_data(kind, loads(dumps(data))) == done


def test_reading_ignores_keys_of_a_newer_writer_and_mends_int64_strings() -> None:
    got = events.from_data("completed", {"usage": {"prompt_tokens": "7"}, "canvases": 2, "added_later": True})
    assert isinstance(got, events.Completed)
    assert got.usage.prompt_tokens == 7 and got.canvases == 2
    with pytest.raises(KeyError):
        events.from_data("no_such_event", {})
