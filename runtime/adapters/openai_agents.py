"""The OpenAI Agents SDK on BlockPress over gRPC: `BlockPressProvider`, a `ModelProvider`.

    from agents import Agent, RunConfig, Runner
    from blockpress.runtime.adapters.openai_agents import BlockPressProvider

    result = await Runner.run(agent, "What is 37*41+12?",
                              run_config=RunConfig(model_provider=BlockPressProvider("127.0.0.1:50051")))

Each model call (`Runner.run`, or `Runner.run_streamed` with the canvases' text as it commits) is one
BlockPress generation job with the agent's function tools as client tools; the
Agents SDK runs the tools and sends their results back in the next call. The SDK's own converter turns
its items into chat messages and the answer back into items, so the mapping is the one the SDK uses
for any chat-completions model. Needs the `openai-agents` extra; imported only when this module is.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from agents.items import ModelResponse, TResponseStreamEvent
from agents.models.chatcmpl_converter import Converter
from agents.models.chatcmpl_stream_handler import ChatCmplStreamHandler
from agents.models.fake_id import FAKE_RESPONSES_ID
from agents.models.interface import Model, ModelProvider
from agents.usage import Usage
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessage, ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion_chunk import (
    Choice as ChunkChoice,
)
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_message_function_tool_call import Function
from openai.types.completion_usage import CompletionUsage
from openai.types.responses import Response

from blockpress.runtime.adapters.messages import to_sdk_messages
from blockpress.runtime.contracts.events import Completed, from_data
from blockpress.runtime.contracts.jobs import EventType, new_job_id
from blockpress.runtime.sdk.aio import AsyncClient
from blockpress.runtime.sdk.results import outcome

__all__ = ["BlockPressModel", "BlockPressProvider"]


class BlockPressModel(Model):
    """One served model as an Agents SDK `Model`; `settings` are denoising settings for every call."""

    def __init__(self, model: str | None, *, address: str | None, api_key: str | None, **settings: Any) -> None:
        self.model = model
        self.address = address
        self.api_key = api_key
        self.settings = settings

    def _request(
        self, system_instructions: Any, input: Any, model_settings: Any, tools: Any, handoffs: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The SDK's messages and the generation options of one model call."""
        messages = Converter.items_to_messages(input)
        if system_instructions:
            messages.insert(0, {"role": "system", "content": system_instructions})
        defs = [Converter.tool_to_openai(t) for t in tools] + [Converter.convert_handoff_tool(h) for h in handoffs]
        options = {**self.settings, "model": self.model, "tools": defs or None}
        if getattr(model_settings, "max_tokens", None):
            options["max_new_tokens"] = model_settings.max_tokens
        return to_sdk_messages(messages), options

    async def get_response(
        self,
        system_instructions: Any,
        input: Any,
        model_settings: Any,
        tools: Any,
        output_schema: Any,
        handoffs: Any,
        tracing: Any,
        **_: Any,
    ) -> ModelResponse:
        messages, options = self._request(system_instructions, input, model_settings, tools, handoffs)
        async with AsyncClient(self.address, api_key=self.api_key) as client:
            result = await client.generate(messages, **options)
        calls: list[Any] = [_call(result.job_id, i, c.name, c.arguments) for i, c in enumerate(result.tool_calls)]
        message = ChatCompletionMessage(role="assistant", content=result.text or None, tool_calls=calls or None)
        usage = Usage(
            requests=1,
            input_tokens=result.usage.prompt_tokens,
            output_tokens=result.usage.completion_tokens,
            total_tokens=result.usage.prompt_tokens + result.usage.completion_tokens,
        )
        return ModelResponse(output=Converter.message_to_output_items(message), usage=usage, response_id=result.job_id)

    async def stream_response(
        self,
        system_instructions: Any,
        input: Any,
        model_settings: Any,
        tools: Any,
        output_schema: Any,
        handoffs: Any,
        tracing: Any,
        **_: Any,
    ) -> AsyncIterator[TResponseStreamEvent]:
        """The turn as Responses stream events, through the SDK's own chat-completions stream handler."""
        messages, options = self._request(system_instructions, input, model_settings, tools, handoffs)
        response = Response(
            id=FAKE_RESPONSES_ID,
            created_at=time.time(),
            model=self.model or "",
            object="response",
            output=[],
            tool_choice="auto",
            tools=[],
            parallel_tool_calls=False,
        )
        chunks = _chunks(self, messages, options)
        # The handler only iterates what it is given; BlockPress's events become OpenAI's chunks first.
        async for event in ChatCmplStreamHandler.handle_stream(response, chunks, model=self.model):  # type: ignore[arg-type]
            yield event


def _call(job_id: str, index: int, name: str, arguments: Any) -> ChatCompletionMessageFunctionToolCall:
    return ChatCompletionMessageFunctionToolCall(
        id=f"call_{job_id}_{index}", type="function", function=Function(name=name, arguments=json.dumps(arguments))
    )


async def _chunks(
    model: BlockPressModel, messages: list[dict[str, Any]], options: dict[str, Any]
) -> AsyncIterator[ChatCompletionChunk]:
    """One generation job's events as chat-completion chunks: canvas text as it commits (without tools;
    with them the worker splits the turn's text from its call only at the end), then the tool calls,
    the finish reason and the usage."""
    tools = bool(options.get("tools"))
    job_id, created = new_job_id(), int(time.time())

    def chunk(delta: ChoiceDelta, finish: Any = None, usage: CompletionUsage | None = None) -> ChatCompletionChunk:
        choices = [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(
            id=job_id, object="chat.completion.chunk", created=created, model=model.model or "", choices=choices,
            usage=usage,
        )  # fmt: skip

    async with AsyncClient(model.address, api_key=model.api_key) as client:
        async for event in client.stream(messages, job_id=job_id, **options):
            if event.type == EventType.CANVAS and not tools and (text := event.data.get("text", "")):
                yield chunk(ChoiceDelta(role="assistant", content=text))
            if not event.is_final:
                continue
            outcome("", event)  # raises the JobError of a job that did not succeed
            done = from_data(event.type, event.data)
            assert isinstance(done, Completed)
            if tools and done.text:
                yield chunk(ChoiceDelta(role="assistant", content=done.text))
            calls = [
                ChoiceDeltaToolCall(
                    index=i,
                    id=f"call_{job_id}_{i}",
                    type="function",
                    function=ChoiceDeltaToolCallFunction(name=c.name, arguments=json.dumps(dict(c.arguments))),
                )
                for i, c in enumerate(done.tool_calls or ())
            ]
            if calls:
                yield chunk(ChoiceDelta(role="assistant", tool_calls=calls))
            u = done.usage
            usage = CompletionUsage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.prompt_tokens + u.completion_tokens,
            )
            finish = "tool_calls" if calls else ("length" if done.stop_reason == "max_new_tokens" else "stop")
            yield chunk(ChoiceDelta(), finish=finish, usage=usage)


class BlockPressProvider(ModelProvider):
    """Models of a BlockPress gateway for the Agents SDK's `RunConfig(model_provider=...)`.

    Args:
        address: the gateway's `host:port`; default `BLOCKPRESS_ADDRESS`, then 127.0.0.1:50051.
        api_key: one of the gateway's API keys, when it has any.
        **settings: denoising settings for every call (`seed`, `max_denoising_steps`, ...).
    """

    def __init__(self, address: str | None = None, *, api_key: str | None = None, **settings: Any) -> None:
        self.address = address
        self.api_key = api_key
        self.settings = settings

    def get_model(self, model_name: str | None) -> Model:
        return BlockPressModel(model_name or None, address=self.address, api_key=self.api_key, **self.settings)
