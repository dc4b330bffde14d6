"""LangChain on BlockPress over gRPC: `ChatBlockPress`, a chat model with `bind_tools` and streaming.

    from blockpress.runtime.adapters.langchain import ChatBlockPress
    llm = ChatBlockPress(address="127.0.0.1:50051", model="tiny-calculator").bind_tools([calculator])
    agent = langgraph.prebuilt.create_react_agent(llm, [calculator])

Each call is one BlockPress generation job; bound tools are its client tools, and a tool call comes back
as the AIMessage's `tool_calls` for LangChain (or LangGraph) to run. Streaming yields each committed
canvas's text as it lands and the tool calls at the end. Needs the `langchain` extra; imported only
when this module is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.messages.utils import convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from blockpress.runtime.adapters.messages import to_sdk_messages
from blockpress.runtime.contracts.events import Completed, from_data
from blockpress.runtime.contracts.jobs import EventType
from blockpress.runtime.sdk.aio import AsyncClient
from blockpress.runtime.sdk.results import Result, outcome
from blockpress.runtime.sdk.sync import Client

__all__ = ["ChatBlockPress"]


class ChatBlockPress(BaseChatModel):
    """A BlockPress model as a LangChain chat model.

    Attributes:
        address: the gateway's `host:port`; None: `BLOCKPRESS_ADDRESS`, then 127.0.0.1:50051.
        model: the served model; None: the gateway's default.
        api_key: one of the gateway's API keys, when it has any.
        settings: denoising settings for every call (`seed`, `max_new_tokens`, ...).
    """

    address: str | None = None
    model: str | None = None
    api_key: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "blockpress"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """This model with `tools` (LangChain tools, functions, pydantic models or OpenAI dicts) bound."""
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _request(
        self, messages: list[BaseMessage], kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        options = {**self.settings, "model": self.model}
        if kwargs.get("tools"):
            options["tools"] = kwargs["tools"]
        return to_sdk_messages(convert_to_openai_messages(messages)), options

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        prompt, options = self._request(messages, kwargs)
        with Client(self.address, api_key=self.api_key) as client:
            return _chat_result(client.generate(prompt, **options))

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        prompt, options = self._request(messages, kwargs)
        async with AsyncClient(self.address, api_key=self.api_key) as client:
            return _chat_result(await client.generate(prompt, **options))

    def _stream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        prompt, options = self._request(messages, kwargs)
        with Client(self.address, api_key=self.api_key) as client:
            for event in client.stream(prompt, **options):
                if (chunk := _chunk(event, bool(options.get("tools")), run_manager)) is not None:
                    yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt, options = self._request(messages, kwargs)
        async with AsyncClient(self.address, api_key=self.api_key) as client:
            async for event in client.stream(prompt, **options):
                if (chunk := _chunk(event, bool(options.get("tools")), None)) is not None:
                    yield chunk


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}


def _chat_result(result: Result) -> ChatResult:
    calls = [
        tool_call(name=c.name, args=dict(c.arguments), id=f"call_{result.job_id}_{i}")
        for i, c in enumerate(result.tool_calls)
    ]
    message = AIMessage(
        content=result.text,
        tool_calls=calls,
        id=result.job_id,
        usage_metadata=_usage(result.usage.prompt_tokens, result.usage.completion_tokens),  # type: ignore[arg-type]
        response_metadata={"stop_reason": result.stop_reason, "model_provider": "blockpress"},
    )
    return ChatResult(generations=[ChatGeneration(message=message)])


def _chunk(event: Any, tools: bool, run_manager: Callable[..., Any] | Any) -> ChatGenerationChunk | None:
    """A stream event as a chunk: canvas text (without tools: with them the call's text is parsed at the
    end), then the final text and tool calls from the `completed` event."""
    if event.type == EventType.CANVAS and not tools:
        return ChatGenerationChunk(message=AIMessageChunk(content=event.data.get("text", "")))
    if not event.is_final:
        return None
    outcome("", event)  # raises the JobError of a job that did not succeed
    done = from_data(event.type, event.data)
    assert isinstance(done, Completed)
    calls = [
        tool_call_chunk(name=c.name, args=json.dumps(dict(c.arguments)), id=f"call_{event.id}_{i}", index=i)
        for i, c in enumerate(done.tool_calls or ())
    ]
    usage = _usage(done.usage.prompt_tokens, done.usage.completion_tokens)
    text = done.text if tools else ""
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=text,
            tool_call_chunks=calls,
            usage_metadata=usage,  # type: ignore[arg-type]
            chunk_position="last",
        )
    )
