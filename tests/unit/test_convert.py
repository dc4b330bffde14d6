"""The pb <-> domain conversions of `blockpress.runtime.convert`, without a server."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from blockpress.runtime import Job, JobState, ModelInfo, ToolCall, convert
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.contracts.jobs import Event, JobRecord, JobSpec
from blockpress.runtime.contracts.settings import DenoiseSettings
from blockpress.runtime.pbdata import is_repeated
from blockpress.runtime.sdk.options import Settings
from blockpress.runtime.sdk.results import outcome
from blockpress.runtime.tracing.store import SpanEventRecord, SpanRecord

_PB_TYPES = {
    int: {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
    },
    float: {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT},
}


def _unoptional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    assert isinstance(hint, types.UnionType) and len(args) == 1, f"{hint} is not `X | None`"
    return args[0]


def test_denoise_settings_and_the_proto_agree_field_for_field() -> None:
    hints = typing.get_type_hints(DenoiseSettings)
    ours = {f.name for f in dataclasses.fields(DenoiseSettings)} - {"extra"}
    wire = pb.Settings.DESCRIPTOR.fields_by_name
    assert ours == set(wire) == set(convert.SETTING_NAMES)
    for name in ours:
        kind, field = _unoptional(hints[name]), wire[name]
        if typing.get_origin(kind) is tuple:  # a list of values: a repeated field of the element's type
            (element, _) = typing.get_args(kind)
            assert is_repeated(field) and field.type in _PB_TYPES[element], name
        else:
            # Presence tells "unset: the checkpoint's default" apart from an explicit zero.
            assert not is_repeated(field) and field.has_presence, name
            assert field.type in _PB_TYPES[kind], name


def test_the_sdk_keyword_settings_are_the_denoise_settings() -> None:
    hints = typing.get_type_hints(Settings)
    dataclass_hints = typing.get_type_hints(DenoiseSettings)
    assert set(hints) == set(convert.SETTING_NAMES)
    for name, hint in hints.items():
        kind, theirs = _unoptional(hint), _unoptional(dataclass_hints[name])
        if typing.get_origin(theirs) is tuple:
            assert typing.get_origin(kind) is Sequence and typing.get_args(kind)[0] is typing.get_args(theirs)[0]
        else:
            assert kind is theirs, name


def test_settings_cross_the_wire_as_they_were_set() -> None:
    settings = {"max_new_tokens": 16, "t_min": 0.5, "seed": 2**62, "stop_token_ids": [1, 5], "t_max": None}
    request = convert.generation_request("hi", settings=settings)
    got = convert.settings_from_pb(request.generation.settings)
    assert got == {"max_new_tokens": 16, "t_min": 0.5, "seed": 2**62, "stop_token_ids": [1, 5]}
    assert all(type(got[k]) is type(v) for k, v in settings.items() if v is not None)
    assert convert.settings_from_pb(pb.Settings()) == {}  # nothing set: every default


def test_an_unknown_setting_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(InvalidArgument) as bad:
        convert.generation_request("hi", settings={"temperature": 1.0})
    assert bad.value.field == "settings.temperature" and "t_min" in bad.value.reason


def test_a_request_the_sdk_writes_is_what_the_gateway_reads() -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "c", "arguments": {"x": 1}}}]},
    ]
    tool = {"type": "function", "function": {"name": "c", "description": "math", "parameters": {"type": "object"}}}
    request = convert.generation_request(messages, job_id="j1", tools=[tool], drafts=True, settings={"seed": 3})
    body = convert.request_to_dict(request)["generation"]
    assert body["messages"][1]["tool_calls"] == [{"name": "c", "arguments": {"x": 1}}]
    assert body["tools"] == [{"name": "c", "description": "math", "parameters": {"type": "object"}}]
    assert (body["settings"], body["drafts"], body["prompt"]) == ({"seed": 3}, True, "")

    agent = convert.agent_request("add", tools="calculator", max_turns=3, max_new_tokens=100, settings={"seed": 1})
    body = convert.request_to_dict(agent)["agent"]
    assert (body["task"], body["tools"], body["max_turns"], body["max_new_tokens"]) == ("add", ["calculator"], 3, 100)
    assert body["settings"] == {"seed": 1}


def test_every_event_comes_back_as_it_went_out() -> None:
    payloads = {
        "queued": {"model": "m"},
        "started": {"attempt": 1, "replica": "r1"},
        "draft": {"canvas_index": 0, "step": 2, "text": "dr"},
        "canvas": {"index": 0, "text": "ab", "steps": 3, "tokens": 2},
        "turn": {"index": 1, "text": "t"},
        "tool_call": {"turn": 0, "call_id": "c1", "name": "calc", "arguments_json": '{"x":1}'},
        "tool_result": {"turn": 0, "call_id": "c1", "name": "calc", "content": "1", "is_error": False},
        "completed": {
            "text": "ab",
            "token_ids": [1, 2**40],
            "stop_reason": "tool_call",
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "prefilled_tokens": 5},
            "timings": {"queue_s": 0.5, "prefill_s": 0.1, "first_canvas_s": 0.2, "denoise_s": 0.3, "total_s": 1.0},
            "canvases": 1,
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}],
        },
        "failed": {"error": {"code": "ENGINE_BROKEN", "message": "cuda"}, "attempt": 2},
        "cancelled": {"reason": "asked"},
        "expired": {"deadline": 12.5},
        "dead_lettered": {"error": {"code": "INTERNAL", "message": "x"}, "deliveries": 3},
    }
    for kind, data in payloads.items():
        event = Event("1-0", kind, data, 1.5)
        assert convert.event_from_pb(convert.event_to_pb("j", event)) == event, kind
    back = convert.event_from_pb(convert.event_to_pb("j", Event("1-0", "completed", payloads["completed"], 1.0)))
    # 64-bit numbers come back as ints, not as the strings of protobuf's JSON form.
    assert back.data["token_ids"] == [1, 2**40] and type(back.data["usage"]["prompt_tokens"]) is int


def test_fill_message_sets_what_parse_dict_sets() -> None:
    from google.protobuf import json_format

    from blockpress.runtime.pbdata import fill_message

    cases = [
        (pb.Completed, {"text": "é", "token_ids": [3, 2**40], "usage": {"prompt_tokens": 5}, "newer_key": [1]}),
        (pb.Failed, {"error": {"code": "X", "message": "m"}, "attempt": 2}),
        (pb.Job, {"job_id": "j", "state": "JOB_STATE_RUNNING", "attempt": None}),
        (pb.Completed, {"canvases": 2.0, "text": "an older writer's float in an int field"}),
    ]
    for cls, data in cases:
        fast, reference = cls(), cls()
        fill_message(data, fast)
        json_format.ParseDict({k: v for k, v in data.items() if v is not None}, reference, ignore_unknown_fields=True)
        assert fast == reference, data
    with pytest.raises(json_format.ParseError):  # what ParseDict refuses is still refused
        fill_message({"canvases": "many"}, pb.Completed())


def test_client_tool_calls_survive_the_wire() -> None:
    completed = {
        "text": "Let me check.",
        "token_ids": [1, 2],
        "stop_reason": "tool_call",
        "usage": {"prompt_tokens": 40, "completion_tokens": 2, "prefilled_tokens": 40},
        "canvases": 1,
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}],
    }
    msg = convert.event_to_pb("job-1", Event("1-0", "completed", completed, 1.0))
    assert [(c.name, c.arguments_json) for c in msg.completed.tool_calls] == [
        ("get_weather", '{"city": "Paris", "days": 3}')
    ]
    result = outcome("job-1", convert.event_from_pb(msg))
    assert result.stop_reason == "tool_call" and result.text == "Let me check."
    assert result.tool_calls == (ToolCall("get_weather", {"city": "Paris", "days": 3}),)
    assert result.usage.prompt_tokens == 40 and result.token_ids == [1, 2]
    # A generation without client tools has none.
    plain = {k: v for k, v in completed.items() if k != "tool_calls"}
    event = convert.event_from_pb(convert.event_to_pb("job-2", Event("1-0", "completed", plain, 1.0)))
    assert outcome("job-2", event).tool_calls == ()


def test_a_job_record_reaches_the_sdk_typed() -> None:
    spec = JobSpec(job_id="j", model="m", kind="agent", deadline=None)
    completed = {"text": "x", "token_ids": [3], "stop_reason": "final_answer", "usage": {"prompt_tokens": 2**33}}
    record = JobRecord(spec=spec, state=JobState.SUCCEEDED, attempt=1, replica="r", result=completed, submitted_at=5.0)
    job = convert.job_from_pb(convert.record_to_pb(record))
    assert isinstance(job, Job)
    assert (job.job_id, job.model, job.kind, job.state, job.attempt) == ("j", "m", "agent", JobState.SUCCEEDED, 1)
    assert (job.deadline, job.replica, job.started_at, job.error) == (None, "r", None, None)
    assert job.result is not None and job.result.usage.prompt_tokens == 2**33 and job.result.token_ids == [3]
    failed = dataclasses.replace(record, state=JobState.FAILED, result=None, error={"code": "X", "message": "m"})
    assert convert.job_from_pb(convert.record_to_pb(failed)).error == {"code": "X", "message": "m"}


def test_model_info_comes_back_typed() -> None:
    info = ModelInfo("tiny", 2**20, 256, "bfloat16", 1, 0, 1024)
    assert {f.name for f in dataclasses.fields(ModelInfo)} == set(pb.ModelInfo.DESCRIPTOR.fields_by_name)
    back = convert.model_info_from_pb(convert.model_info_to_pb(info))
    assert back == info and type(back.context_length) is int


def test_a_kept_span_survives_the_wire() -> None:
    step = SpanEventRecord("step", 1_500, {"step": 1, "step_ms": 2.5, "accepted": 40})
    spans = [
        SpanRecord("a" * 32, "1" * 16, None, "gateway.Generate", 1_000, 9_000, "gw", "SERVER", "OK", "",
                   {"rpc.method": "Generate", "rpc.grpc.status_code": 0}),
        SpanRecord("a" * 32, "2" * 16, "1" * 16, "engine.canvas", 1_200, 2_000, "replica", "INTERNAL", "ERROR",
                   "boom", {"blockpress.canvas.index": 0, "tags": ["x", "y"]}, [step]),
    ]  # fmt: skip
    back = convert.spans_from_pb(pb.Trace(trace_id="a" * 32, spans=[convert.span_to_pb(s) for s in spans]))
    assert back == spans


def test_every_job_state_has_its_proto_value() -> None:
    for state in JobState:
        assert convert.state_from_pb(convert.state_to_pb(state)) is state
