"""Anthropic's `/v1/messages` with the real `anthropic` client, and BlockPress's `/v1/blockpress/agent`, against
the real service: the shipped tiny checkpoint, trained to call `calculator`, behind a Gateway's HTTP front."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest
from httpservice import CALCULATOR, QUESTION, Service

from blockpress.runtime.contracts.jobs import JobState

pytestmark = pytest.mark.slow

ASK: list[Any] = [{"role": "user", "content": QUESTION}]
TOOL: Any = {
    "name": CALCULATOR["function"]["name"],
    "description": CALCULATOR["function"]["description"],
    "input_schema": CALCULATOR["function"]["parameters"],
}


def client(svc: Service) -> anthropic.AsyncAnthropic:
    # The SDK appends `/v1/messages` to its base URL itself.
    return anthropic.AsyncAnthropic(base_url=svc.base_url.removesuffix("/v1"), api_key="none", max_retries=0)


async def test_a_plain_message_is_one_job_per_idempotency_key(service: Service) -> None:
    async with client(service) as claude:
        first = await claude.messages.create(
            model="tiny-calculator", max_tokens=32, messages=ASK, extra_headers={"Idempotency-Key": "a-1"},
            extra_body={"seed": 1},
        )  # fmt: skip
        again = await claude.messages.create(
            model="tiny-calculator", max_tokens=32, messages=ASK, extra_headers={"Idempotency-Key": "a-1"},
            extra_body={"seed": 1},
        )  # fmt: skip
    assert first.id == again.id == "msg_a-1" and first.role == "assistant" and first.type == "message"
    assert first.stop_reason in ("end_turn", "max_tokens") and first.model == "tiny-calculator"
    # No tools offered: a call the model starts anyway is cut off with the turn's markers.
    assert {b.type for b in first.content} <= {"text"} and first.content == again.content
    assert first.usage.input_tokens > 0 and 0 < first.usage.output_tokens <= 32
    record = await service.queue.get("a-1")
    assert record.state is JobState.SUCCEEDED and record.spec.settings == {"max_new_tokens": 32, "seed": 1}


async def test_a_tool_use_round_trip(service: Service) -> None:
    async with client(service) as claude:
        asked = await claude.messages.create(
            model="tiny-calculator", max_tokens=256, messages=ASK, tools=[TOOL], extra_body={"seed": 0}
        )
        uses = [b for b in asked.content if b.type == "tool_use"]
        assert asked.stop_reason == "tool_use" and len(uses) == 1
        [use] = uses
        assert use.name == "calculator" and use.id.startswith("toolu_") and isinstance(use.input, dict)
        assert use.input["expression"] == "37*41+12"
        result = {"type": "tool_result", "tool_use_id": use.id, "content": str(37 * 41 + 12)}
        conversation = [*ASK, {"role": "assistant", "content": asked.content}, {"role": "user", "content": [result]}]
        answered = await claude.messages.create(
            model="tiny-calculator", max_tokens=256, messages=conversation, tools=[TOOL], extra_body={"seed": 0}
        )
    assert answered.stop_reason == "end_turn" and [b.type for b in answered.content] == ["text"]
    text = answered.content[0].text  # type: ignore[union-attr]
    assert "1529" in text and "<" not in text  # the turn's markers are cut off
    # The second turn started from the first turn's KV cache (a session derived from the conversation's start).
    assert answered.usage.cache_read_input_tokens is not None and answered.usage.cache_read_input_tokens > 0


async def test_a_streamed_tool_use_builds_the_same_message(service: Service) -> None:
    async with (
        client(service) as claude,
        claude.messages.stream(
            model="tiny-calculator", max_tokens=256, messages=ASK, tools=[TOOL], extra_body={"seed": 0}
        ) as stream,
    ):
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and use.name == "calculator"
    assert use.input == {"expression": "37*41+12"} and final.usage.output_tokens > 0


async def test_a_streamed_answer_to_a_tool_result(service: Service) -> None:
    async with client(service) as claude:
        asked = await claude.messages.create(
            model="tiny-calculator", max_tokens=256, messages=ASK, tools=[TOOL], extra_body={"seed": 0}
        )
        [use] = [b for b in asked.content if b.type == "tool_use"]
        result = {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "1529"}]}
        conversation = [*ASK, {"role": "assistant", "content": asked.content}, {"role": "user", "content": [result]}]
        async with claude.messages.stream(
            model="tiny-calculator", max_tokens=256, messages=conversation, tools=[TOOL], extra_body={"seed": 0}
        ) as stream:
            pieces = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
    assert final.stop_reason == "end_turn" and [b.type for b in final.content] == ["text"]
    assert "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
    assert "1529" in final.content[0].text and final.usage.output_tokens > 0  # type: ignore[union-attr]


async def test_errors_carry_anthropics_body(service: Service) -> None:
    async with client(service) as claude:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await claude.messages.create(model="tiny-calculator", max_tokens=8, messages=ASK, extra_body={"t_min": -1})
        with pytest.raises(anthropic.BadRequestError) as unanswered:
            stray = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}
            await claude.messages.create(model="tiny-calculator", max_tokens=8, messages=[stray])
        with pytest.raises(anthropic.NotFoundError) as missing:
            await claude.messages.create(model="no-such-model", max_tokens=8, messages=ASK)
    assert bad.value.status_code == 400 and "t_min" in bad.value.message
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages[0].content[0].tool_use_id" in unanswered.value.message
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


async def test_a_server_side_agent_task_plain_and_streamed(service: Service) -> None:
    body = {"model": "tiny-calculator", "task": QUESTION, "tools": ["calculator"], "max_turns": 4, "seed": 0}
    async with httpx.AsyncClient(base_url=service.base_url, timeout=120) as http:
        done = await http.post("/blockpress/agent", json=body, headers={"Idempotency-Key": "agent-1"})
        assert done.status_code == 200, done.text
        result = done.json()
        lines: list[str] = []
        async with http.stream("POST", "/blockpress/agent", json={**body, "stream": True}) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
        unknown = await http.post("/blockpress/agent", json={**body, "tools": ["nope"]})
    assert result["id"] == "agent-1" and result["object"] == "blockpress.agent.result"
    assert result["stop_reason"] == "final_answer" and 1 < result["turns"] <= 4
    [call] = result["tool_calls"]
    assert call["name"] == "calculator" and call["arguments"]["expression"].startswith("37*41+")
    assert call["result"] is not None and str(json.loads(call["result"])["result"]) in result["text"]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    kinds = [e["type"] for e in events]
    assert all(e["object"] == "blockpress.agent.event" for e in events)
    assert kinds[-1] == "completed" and "tool_call" in kinds and "tool_result" in kinds
    assert unknown.status_code == 400 and unknown.json()["error"]["param"].startswith("tools")
