"""The OpenAI-compatible API with the real `openai` client against the real service: the shipped tiny
checkpoint, trained to call `calculator`, behind a Gateway's HTTP front, real Redis and a replica's runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import ANY

import httpx
import openai
import pytest
from httpservice import CALCULATOR, QUESTION, Service, running
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from blockpress.runtime.contracts.jobs import JobState
from blockpress.runtime.tracing.names import Attr
from blockpress.runtime.tracing.telemetry import setup_tracing

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": QUESTION}]


def client(svc: Service, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=svc.base_url, api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


async def test_models_lists_the_checkpoint_with_its_context_length(service: Service) -> None:
    async with client(service) as oai:
        page = await oai.models.list()
        one = await oai.models.retrieve("tiny-calculator")
    [model] = page.data
    assert model.id == one.id == "tiny-calculator" and model.owned_by == "blockpress"
    assert model.model_extra is not None and model.model_extra["context_length"] == 4096


async def test_a_plain_completion_is_one_job_per_idempotency_key(service: Service) -> None:
    async with client(service) as oai:
        first = await oai.chat.completions.create(
            model="tiny-calculator", messages=ASK, seed=1, max_tokens=32, extra_headers={"Idempotency-Key": "k-1"}
        )
        again = await oai.chat.completions.create(
            model="tiny-calculator", messages=ASK, seed=1, max_tokens=32, extra_headers={"Idempotency-Key": "k-1"}
        )
    assert first.id == again.id == "chatcmpl-k-1"
    choice = first.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert choice.message.tool_calls is None and choice.message.content == again.choices[0].message.content
    assert first.usage is not None and first.usage.prompt_tokens > 0 and 0 < first.usage.completion_tokens <= 32
    record = await service.queue.get("k-1")
    assert record.state is JobState.SUCCEEDED and record.spec.settings == {"max_new_tokens": 32, "seed": 1}


async def test_a_tool_call_round_trip_reuses_the_kv_cache(service: Service) -> None:
    async with client(service) as oai:
        asked = await oai.chat.completions.create(model="tiny-calculator", messages=ASK, tools=[CALCULATOR], seed=0)
        [call] = asked.choices[0].message.tool_calls or []
        assert asked.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
        assert call.type == "function" and call.function.name == "calculator"
        expression = __import__("json").loads(call.function.arguments)["expression"]
        assert expression == "37*41+12"
        conversation = [*ASK, asked.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": str(37 * 41 + 12)}]  # fmt: skip
        answered = await oai.chat.completions.create(
            model="tiny-calculator", messages=conversation, tools=[CALCULATOR], seed=0
        )
    message = answered.choices[0].message
    assert answered.choices[0].finish_reason == "stop" and message.tool_calls is None
    assert message.content is not None and "1529" in message.content
    # The second turn started from the cache the first left on the replica (a session derived from the
    # conversation's start): only the new tokens were prefilled.
    assert answered.usage is not None and answered.usage.prompt_tokens_details is not None
    assert answered.usage.prompt_tokens_details.cached_tokens > 0


async def test_a_streamed_tool_call_with_usage_and_drafts(service: Service) -> None:
    async with client(service) as oai:
        stream = await oai.chat.completions.create(
            model="tiny-calculator", messages=ASK, tools=[CALCULATOR], seed=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"drafts": True, "max_denoising_steps": 8},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    [tool_delta] = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert tool_delta.index == 0 and tool_delta.id and tool_delta.function is not None
    assert tool_delta.function.name == "calculator" and '"expression"' in (tool_delta.function.arguments or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    drafts = [c.model_extra["blockpress"]["draft"] for c in chunks if c.model_extra and c.model_extra.get("blockpress")]
    assert drafts and all({"canvas_index", "step", "text"} <= set(d) for d in drafts)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_errors_carry_openais_body_and_status(service: Service) -> None:
    async with client(service) as oai:
        with pytest.raises(openai.BadRequestError) as bad:
            await oai.chat.completions.create(model="tiny-calculator", messages=ASK, extra_body={"t_min": -1})
        with pytest.raises(openai.BadRequestError) as unanswered:
            tool = {"role": "tool", "tool_call_id": "call_nope", "content": "1"}
            await oai.chat.completions.create(model="tiny-calculator", messages=[*ASK, tool])
        with pytest.raises(openai.BadRequestError) as shape:
            await oai.chat.completions.create(model="tiny-calculator", messages=[])
        with pytest.raises(openai.NotFoundError) as missing:
            await oai.chat.completions.create(model="gpt-4o", messages=ASK)
    assert bad.value.status_code == 400 and bad.value.param == "t_min" and "greater than 0" in bad.value.message
    assert unanswered.value.param == "messages[1].tool_call_id"
    assert shape.value.param == "messages" and shape.value.type == "invalid_request_error"
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


async def test_api_keys_guard_the_api(redis_client: Any, tiny_engine: Any, tiny_card: Any) -> None:
    async with running(redis_client, tiny_engine, tiny_card, api_keys=("sekret",)) as svc:
        async with client(svc, api_key="wrong") as oai:
            with pytest.raises(openai.AuthenticationError) as denied:
                await oai.models.list()
        async with client(svc, api_key="sekret") as oai:
            assert [m.id async for m in oai.models.list()] == ["tiny-calculator"]
    assert denied.value.status_code == 401 and denied.value.type == "authentication_error"


async def test_a_full_queue_is_429_with_retry_after_and_no_replica_503(
    redis_client: Any, tiny_engine: Any, tiny_card: Any
) -> None:
    async with running(redis_client, tiny_engine, tiny_card, replica=False, max_queue=1) as svc, client(svc) as oai:
        # Nothing takes the jobs: the first waits in the queue, the second finds it full.
        first = asyncio.create_task(oai.chat.completions.create(model="tiny-calculator", messages=ASK))
        while await svc.queue.depth("tiny-calculator") < 1:
            await asyncio.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as full:
            await oai.chat.completions.create(model="tiny-calculator", messages=ASK)
        first.cancel()
    assert full.value.status_code == 429 and int(full.value.response.headers["retry-after"]) >= 1
    await redis_client.flushall()  # no heartbeat left: no replica is live
    async with running(redis_client, tiny_engine, tiny_card, replica=False, beat=False) as svc, client(svc) as oai:
        with pytest.raises(openai.InternalServerError) as down:
            await oai.chat.completions.create(model="tiny-calculator", messages=ASK)
    assert down.value.status_code == 503 and "no replica" in down.value.message


async def test_a_client_that_goes_away_cancels_its_job(redis_client: Any, tiny_engine: Any, tiny_card: Any) -> None:
    async with running(redis_client, tiny_engine, tiny_card, replica=False) as svc, client(svc) as oai:
        stream = await oai.chat.completions.create(
            model="tiny-calculator", messages=ASK, stream=True, extra_headers={"Idempotency-Key": "gone-1"}
        )
        first = await stream.__anext__()  # the job is queued and nothing runs it
        assert first.choices[0].delta.role == "assistant"
        await stream.close()
        plain = asyncio.create_task(
            oai.chat.completions.create(
                model="tiny-calculator", messages=ASK, extra_headers={"Idempotency-Key": "gone-2"}
            )
        )
        while not await svc.redis_has("gone-2"):
            await asyncio.sleep(0.05)
        plain.cancel()
        for job_id in ("gone-1", "gone-2"):
            for _ in range(100):
                record = await svc.queue.get(job_id)
                if record.state is JobState.CANCELLED or record.cancel_requested:
                    break
                await asyncio.sleep(0.05)
            assert record.state is JobState.CANCELLED or record.cancel_requested, job_id


async def test_a_request_is_traced_like_a_grpc_call(service: Service) -> None:
    spans = InMemorySpanExporter()
    setup_tracing("blockpress-test", processors=(SimpleSpanProcessor(spans),))
    try:
        async with client(service) as oai:
            done = await oai.chat.completions.create(
                model="tiny-calculator", messages=ASK, max_tokens=8, extra_headers={"Idempotency-Key": "traced-1"}
            )
        finished = spans.get_finished_spans()
    finally:
        spans.shutdown()
    assert done.id == "chatcmpl-traced-1"
    [front] = [s for s in finished if s.name == "gateway.ChatCompletions"]
    assert front.attributes is not None and front.attributes["http.response.status_code"] == 200
    assert front.attributes[Attr.JOB_ID] == "traced-1" and front.attributes["http.route"] == "/v1/chat/completions"
    record = await service.queue.get("traced-1")
    assert record.spec.trace_context["traceparent"].split("-")[1] == f"{front.context.trace_id:032x}"


async def test_a_body_over_the_request_limit_is_413(redis_client: Any, tiny_engine: Any, tiny_card: Any) -> None:
    async with running(redis_client, tiny_engine, tiny_card, max_request_bytes=4096) as svc, client(svc) as oai:
        big = [{"role": "user", "content": "x" * 5000}]
        with pytest.raises(openai.APIStatusError) as declared:
            await oai.chat.completions.create(model="tiny-calculator", messages=big)  # type: ignore[arg-type]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the bytes read are counted
            yield b'{"model": "tiny-calculator", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}]}'

        async with httpx.AsyncClient(base_url=svc.base_url) as http:
            streamed = await http.post("/chat/completions", content=chunked())
            anthropic_flavor = await http.post("/messages", content=b"{" + b" " * 5000 + b"}")
        small = await oai.chat.completions.create(model="tiny-calculator", messages=ASK, max_tokens=4)
    assert declared.value.status_code == 413 and declared.value.type == "invalid_request_error"
    assert declared.value.code == "request_too_large" and "4096 bytes" in declared.value.message
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in streamed.request.headers
    assert anthropic_flavor.status_code == 413
    assert anthropic_flavor.json() == {"type": "error", "error": {"type": "request_too_large", "message": ANY}}
    assert small.choices[0].finish_reason in ("stop", "length")
    assert await svc.queue.depth("tiny-calculator") == 0  # nothing oversized was queued
