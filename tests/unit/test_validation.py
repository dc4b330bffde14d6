"""Request validation at the gateway's edge, the error mapping, and the settings, without a server."""

from __future__ import annotations

import pathlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockpress.agents import errors as agent_errors
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.cli.embedded import server_tools
from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts import errors
from blockpress.runtime.contracts.jobs import JobSpec
from blockpress.runtime.convert import request_to_dict
from blockpress.runtime.gateway.cards import ModelCard, load_model_card
from blockpress.runtime.gateway.validation import validate_submit
from blockpress.workers import errors as engine_errors

SETTINGS = RuntimeSettings(max_prompt_chars=10_000, max_messages=4, max_tools=2)


@pytest.fixture(scope="module")
def card(tiny_checkpoint: Path) -> ModelCard:
    return load_model_card(str(tiny_checkpoint))


def gen(**fields: Any) -> pb.SubmitRequest:
    return pb.SubmitRequest(generation=pb.GenerationTask(**fields))


def validate(request: pb.SubmitRequest, card: ModelCard, settings: RuntimeSettings = SETTINGS, **kw: Any) -> JobSpec:
    """The one way a request is admitted: plain data from the proto, then `validate_submit`."""
    return validate_submit(
        request_to_dict(request), settings=settings, cards={card.name: card}, default_model=card.name, **kw
    )


BAD: list[tuple[str, pb.SubmitRequest, str, str]] = [
    ("no task", pb.SubmitRequest(), "task", "not set"),
    ("empty prompt", gen(prompt=""), "generation.prompt", "empty"),
    ("blank prompt", gen(prompt="  \n"), "generation.prompt", "empty"),
    (
        "prompt and messages",
        gen(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")]),
        "generation.prompt",
        "not both",
    ),
    ("oversized prompt", gen(prompt="x" * 10_001), "generation.prompt", "10001 characters"),
    ("bad role", gen(messages=[pb.ChatMessage(role="robot", content="x")]), "generation.messages[0].role", ""),
    (
        "tool message without name",
        gen(messages=[pb.ChatMessage(role="tool", content="1")]),
        "generation.messages[0]",
        "name",
    ),
    (
        "too many messages",
        gen(messages=[pb.ChatMessage(role="user", content="x")] * 5),
        "generation.messages",
        "limit 4",
    ),
    ("negative t_min", gen(prompt="hi", settings=pb.Settings(t_min=-1)), "generation.settings.t_min", "greater"),
    ("nan t_max", gen(prompt="hi", settings=pb.Settings(t_max=float("nan"))), "generation.settings.t_max", "finite"),
    (
        "zero max_new_tokens",
        gen(prompt="hi", settings=pb.Settings(max_new_tokens=0)),
        "generation.settings.max_new_tokens",
        "at least 1",
    ),
    (
        "steps too high",
        gen(prompt="hi", settings=pb.Settings(max_denoising_steps=5000)),
        "generation.settings.max_denoising_steps",
        "4096",
    ),
    ("negative seed", gen(prompt="hi", settings=pb.Settings(seed=-3)), "generation.settings.seed", "2**63"),
    (
        "t_max below t_min",
        gen(prompt="hi", settings=pb.Settings(t_min=0.8, t_max=0.2)),
        "generation.settings.t_max",
        "t_min",
    ),
    (
        "negative stop token",
        gen(prompt="hi", settings=pb.Settings(stop_token_ids=[-1])),
        "generation.settings.stop_token_ids",
        "",
    ),
    ("bad job id", pb.SubmitRequest(job_id="a b", generation=pb.GenerationTask(prompt="hi")), "job_id", "letters"),
    ("long job id", pb.SubmitRequest(job_id="a" * 129, generation=pb.GenerationTask(prompt="hi")), "job_id", ""),
    ("bad session id", gen(prompt="hi", session_id="has space"), "generation.session_id", ""),
    (
        "tools without messages",
        gen(prompt="hi", tools=[pb.Tool(name="calc", parameters_json="{}")]),
        "generation.tools",
        "chat messages",
    ),
    (
        "tool parameters not JSON",
        gen(messages=[pb.ChatMessage(role="user", content="x")], tools=[pb.Tool(name="c", parameters_json="{")]),
        "generation.tools[0].parameters_json",
        "not valid JSON",
    ),
    (
        "tool parameters a list",
        gen(messages=[pb.ChatMessage(role="user", content="x")], tools=[pb.Tool(name="c", parameters_json="[]")]),
        "generation.tools[0].parameters_json",
        "JSON object",
    ),
    (
        "bad tool name",
        gen(messages=[pb.ChatMessage(role="user", content="x")], tools=[pb.Tool(name="1 bad", parameters_json="{}")]),
        "generation.tools[0].name",
        "",
    ),
    (
        "too many tools",
        gen(
            messages=[pb.ChatMessage(role="user", content="x")],
            tools=[pb.Tool(name=f"t{i}", parameters_json="{}") for i in range(3)],
        ),
        "generation.tools",
        "limit 2",
    ),
    (
        "tool call arguments not an object",
        gen(
            messages=[
                pb.ChatMessage(role="assistant", content="", tool_calls=[pb.ToolCall(name="c", arguments_json="3")])
            ]
        ),
        "generation.messages[0].tool_calls[0].arguments_json",
        "JSON object",
    ),
    ("empty agent task", pb.SubmitRequest(agent=pb.AgentTask(task="")), "agent.task", "empty"),
    ("negative max_turns", pb.SubmitRequest(agent=pb.AgentTask(task="t", max_turns=-1)), "agent.max_turns", ""),
    ("agent tool twice", pb.SubmitRequest(agent=pb.AgentTask(task="t", tools=["a", "a"])), "agent.tools", "twice"),
]


@pytest.mark.parametrize(("request_", "field", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_field(card: ModelCard, request_: pb.SubmitRequest, field: str, reason: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        validate(request_, card)
    assert info.value.field == field
    assert reason in info.value.reason
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_prompt_longer_than_context_gives_both_numbers(card: ModelCard) -> None:
    # The tiny tokenizer is byte-level: one token per character, plus <bos>.
    n = card.context_length
    with pytest.raises(errors.InvalidArgument) as info:
        validate(gen(prompt="a" * n), card)
    assert info.value.field == "generation.prompt"
    assert f"{n + 1} prompt tokens" in info.value.reason
    assert f"context of {n} tokens" in info.value.reason


def test_prompt_that_just_fits_is_accepted(card: ModelCard) -> None:
    # Counted as the engine counts: prompt tokens plus whole canvases for the new tokens.
    room = card.context_length - card.canvas_length - 1  # 1 for <bos>
    validate(gen(prompt="a" * room, settings=pb.Settings(max_new_tokens=card.canvas_length)), card)
    with pytest.raises(errors.InvalidArgument):
        validate(gen(prompt="a" * (room + 1), settings=pb.Settings(max_new_tokens=card.canvas_length)), card)


def test_chat_messages_are_counted_with_the_template(card: ModelCard) -> None:
    msgs = [pb.ChatMessage(role="user", content="a" * (card.context_length - 60))]
    with pytest.raises(errors.InvalidArgument) as info:
        validate(gen(messages=msgs, settings=pb.Settings(max_new_tokens=64)), card)
    assert info.value.field == "generation.messages"


def test_unknown_model_is_not_found(card: ModelCard) -> None:
    with pytest.raises(errors.ModelNotFound) as info:
        validate(pb.SubmitRequest(model="nope", generation=pb.GenerationTask(prompt="hi")), card)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert card.name in info.value.message


def test_a_good_request_becomes_a_spec(card: ModelCard) -> None:
    request = pb.SubmitRequest(
        job_id="job-1",
        generation=pb.GenerationTask(
            messages=[pb.ChatMessage(role="user", content="2+2?")],
            settings=pb.Settings(max_new_tokens=16, seed=7, stop_token_ids=[1, 5]),
            drafts=True,
            tools=[pb.Tool(name="calculator", description="math", parameters_json='{"type":"object"}')],
            session_id="s1",
        ),
    )
    spec = validate(request, card, deadline=123.0, trace_context={"traceparent": "x"})
    assert (spec.job_id, spec.model) == ("job-1", card.name)
    assert spec.trace_context == {"traceparent": "x"}
    assert spec.kind == "generate" and spec.prompt is None
    assert spec.messages == [{"role": "user", "content": "2+2?"}]
    assert spec.settings == {"max_new_tokens": 16, "seed": 7, "stop_token_ids": [1, 5]}
    assert spec.tools == [
        {
            "type": "function",
            "function": {"name": "calculator", "description": "math", "parameters": {"type": "object"}},
        }
    ]
    assert (spec.drafts, spec.deadline, spec.session_id) == (True, 123.0, "s1")


def test_agent_request_becomes_an_agent_spec(card: ModelCard) -> None:
    request = pb.SubmitRequest(agent=pb.AgentTask(task="add", tools=["calculator"], max_turns=3, max_seconds=9.5))
    spec = validate(request, card)
    assert spec.kind == "agent" and spec.job_id and spec.deadline is None
    assert spec.agent == {
        "task": "add",
        "tools": ["calculator"],
        "max_turns": 3,
        "max_new_tokens": None,
        "max_seconds": 9.5,
    }


def test_an_unknown_agent_tool_is_refused_naming_the_known_ones(card: ModelCard) -> None:
    request = pb.SubmitRequest(agent=pb.AgentTask(task="add", tools=["calculator", "rm_rf"]))
    with pytest.raises(errors.InvalidArgument) as bad:
        validate(request, card, agent_tools=server_tools(SETTINGS))
    assert bad.value.field == "agent.tools"
    assert "'rm_rf'" in bad.value.reason and "calculator" in bad.value.reason and "python" in bad.value.reason


def test_http_get_is_a_known_tool_only_with_allowed_hosts(card: ModelCard) -> None:
    request = pb.SubmitRequest(agent=pb.AgentTask(task="fetch", tools=["http_get"]))
    with pytest.raises(errors.InvalidArgument, match="'http_get'") as bad:
        validate(request, card, agent_tools=server_tools(SETTINGS))
    assert bad.value.field == "agent.tools" and "http_get" not in bad.value.reason.partition("have:")[2]
    allowed = SETTINGS.model_copy(update={"agent_http_allowed_hosts": ("example.org",)})
    spec = validate(request, card, allowed, agent_tools=server_tools(allowed))
    assert spec.agent is not None and spec.agent["tools"] == ["http_get"]


def test_an_agent_task_without_a_turn_limit_gets_the_default(card: ModelCard) -> None:
    request = pb.SubmitRequest(agent=pb.AgentTask(task="add", tools=["calculator"]))
    spec = validate(request, card, SETTINGS.model_copy(update={"agent_default_max_turns": 5}))
    assert spec.agent is not None and spec.agent["max_turns"] == 5


# ---- the one mapping to status codes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("prompt", "empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("m", ["a"]), grpc.StatusCode.NOT_FOUND),
        (errors.JobNotFound("j"), grpc.StatusCode.NOT_FOUND),
        (errors.JobFinished("j", "SUCCEEDED"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unauthenticated("no"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.QueueFull(0.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ServiceUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.InvalidSettings("t_min", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.TraceNotFound("j"), grpc.StatusCode.NOT_FOUND),
        (RuntimeError("secret prompt text"), grpc.StatusCode.INTERNAL),
    ],
)
def test_to_status_maps_every_error(exc: BaseException, code: grpc.StatusCode) -> None:
    got, message, _ = errors.to_status(exc)
    assert got is code
    if code is grpc.StatusCode.INTERNAL:
        assert "secret" not in message  # a bug's text may hold request data


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidSettings("t_min", "bad"), "INVALID_ARGUMENT"),
        (engine_errors.PromptTooLong(10, 8), "INVALID_ARGUMENT"),
        (engine_errors.InvalidRequest("prompt: is empty"), "INVALID_ARGUMENT"),
        (engine_errors.EngineBroken("cuda"), "UNAVAILABLE"),
        (engine_errors.GenerationCancelled(), "CANCELLED"),
        (engine_errors.ModelConfigError("not a checkpoint"), "FAILED_PRECONDITION"),
        (agent_errors.InvalidAgentTask("agent.max_turns", "bad"), "INVALID_ARGUMENT"),
        (agent_errors.ToolConfigError("entry point broken"), "FAILED_PRECONDITION"),
        (errors.ServiceUnavailable("down"), "UNAVAILABLE"),
        (RuntimeError("secret prompt text"), "INTERNAL"),
    ],
)
def test_a_failed_job_carries_the_code_of_who_must_act(exc: BaseException, code: str) -> None:
    assert engine_errors.error_code(exc) == code


@pytest.mark.parametrize(
    "exc",
    [
        errors.InvalidArgument("generation.prompt", "is empty"),
        errors.ModelNotFound("m", ["a"]),
        errors.JobNotFound("j"),
        errors.TraceNotFound("j"),
        errors.JobFinished("j", "FAILED"),
        errors.QueueFull(0.25, "model 'm' has 4 queued jobs"),
        errors.ServiceUnavailable("draining"),
    ],
)
def test_from_status_gives_back_the_same_type(exc: errors.BlockPressError) -> None:
    back = errors.from_status(*errors.to_status(exc))
    assert type(back) is type(exc)
    assert back.code is exc.code and back.message == exc.message
    if isinstance(exc, errors.QueueFull):
        assert isinstance(back, errors.QueueFull) and back.retry_after_s == pytest.approx(0.25)
        assert "retry after 250 ms" in back.message
    if isinstance(exc, errors.InvalidArgument):
        assert isinstance(back, errors.InvalidArgument) and back.field == "generation.prompt"


def test_an_invalid_setting_names_its_field_on_the_wire() -> None:
    back = errors.from_status(*errors.to_status(errors.InvalidSettings("agent.settings.t_min", "must be positive")))
    assert isinstance(back, errors.InvalidArgument)
    assert back.field == "agent.settings.t_min" and back.reason == "must be positive"


def test_from_status_without_our_trailer_uses_the_code() -> None:
    back = errors.from_status(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert isinstance(back, errors.ServiceUnavailable) and back.message == "connection refused"


# ---- settings ---------------------------------------------------------------------------------------


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKPRESS_MODELS", "a, /m/b")
    monkeypatch.setenv("BLOCKPRESS_API_KEYS", "k1,k2")
    monkeypatch.setenv("BLOCKPRESS_PORT", "6000")
    monkeypatch.setenv("BLOCKPRESS_AGENT_HTTP_ALLOWED_HOSTS", "example.org, api.example.com")
    monkeypatch.setenv("BLOCKPRESS_AGENT_DEFAULT_MAX_TURNS", "12")
    s = RuntimeSettings()
    assert s.models == ("a", "/m/b") and s.port == 6000
    assert s.agent_http_allowed_hosts == ("example.org", "api.example.com") and s.agent_default_max_turns == 12
    assert s.api_key_values() == {"k1", "k2"}
    assert "k1" not in repr(s)  # keys never show up in logs of the settings
    assert RuntimeSettings(port=7000).port == 7000  # keyword arguments (flags) win


def test_replica_and_metrics_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from blockpress.runtime.cli.embedded import replica_options

    defaults = RuntimeSettings()
    assert defaults.replica_max_sessions == 8
    assert defaults.replica_metrics_port is None and defaults.gateway_metrics_port is None  # both off
    assert defaults.trace_retention_s == 7 * 24 * 3600
    monkeypatch.setenv("BLOCKPRESS_REPLICA_MAX_SESSIONS", "3")
    monkeypatch.setenv("BLOCKPRESS_REPLICA_METRICS_PORT", "0")
    monkeypatch.setenv("BLOCKPRESS_GATEWAY_METRICS_PORT", "9100")
    monkeypatch.setenv("BLOCKPRESS_TRACE_RETENTION_S", "3600")
    monkeypatch.setenv("BLOCKPRESS_AGENT_HTTP_ALLOWED_HOSTS", "example.org")
    s = RuntimeSettings()
    assert (s.replica_max_sessions, s.replica_metrics_port, s.gateway_metrics_port) == (3, 0, 9100)
    assert s.trace_retention_s == 3600.0
    # What `serve`, `replicas` and the embedded runtime hand every ReplicaPool.
    options = replica_options(s)
    assert options["max_sessions"] == 3 and options["metrics_port"] == 0
    assert options["http_allowed_hosts"] == ("example.org",) and options["trace_retention_s"] == 3600.0


def test_replicas_offer_http_get_only_for_allowed_hosts() -> None:
    from blockpress.workers.replica import _agent_options

    assert "http_get" not in _agent_options(None)["registry"]
    assert "http_get" in _agent_options(None, ("example.org",))["registry"]


def test_settings_reject_bad_values() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="port"):
        RuntimeSettings(port=70000)


# ---- generated code ---------------------------------------------------------------------------------


def test_generated_grpc_code_is_current(tmp_path: pathlib.Path) -> None:
    from blockpress.runtime._pb import _generate

    root = pathlib.Path(__file__).resolve().parents[2]
    fresh = _generate.generate(tmp_path, root / "proto")
    for path in fresh:
        committed = root / "runtime" / "_pb" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"
