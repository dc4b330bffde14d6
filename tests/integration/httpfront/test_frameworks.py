"""Agent frameworks against the real service on the tiny checkpoint: the OpenAI Agents SDK and LangGraph,
each through the HTTP API (their own OpenAI clients) and through BlockPress's gRPC adapters."""

from __future__ import annotations

import pytest
from httpservice import QUESTION, Service
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent
from openai import AsyncOpenAI

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    RawResponsesStreamEvent,
    RunConfig,
    RunItemStreamEvent,
    Runner,
    function_tool,
)
from blockpress.runtime.adapters.langchain import ChatBlockPress
from blockpress.runtime.adapters.openai_agents import BlockPressProvider

pytestmark = [
    pytest.mark.slow,
    # LangGraph 1.x points to `langchain.agents.create_agent`, a package these tests do not otherwise need.
    pytest.mark.filterwarnings("ignore:create_react_agent has been moved"),
]

CALLS: list[str] = []


def _calculate(expression: str) -> str:
    CALLS.append(expression)
    a, rest = expression.split("*")
    b, c = rest.split("+")
    return str(int(a) * int(b) + int(c))


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with integers, +, - and *.

    Args:
        expression: for example 37*41+12
    """
    return _calculate(expression)


@tool("calculator")
def lc_calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with integers, +, - and *."""
    return _calculate(expression)


def check_agents_run(final: str) -> None:
    # The tiny model sometimes miscopies a digit of the question (its model card says so); what is under
    # test is the round trip: the framework ran the call the model made and the answer uses its result.
    assert CALLS and CALLS[-1].startswith("37*41+") and _calculate(CALLS[-1]) in final


async def test_openai_agents_runner_over_http(service: Service) -> None:
    CALLS.clear()
    oai = AsyncOpenAI(base_url=service.base_url, api_key="none", max_retries=0)
    model = OpenAIChatCompletionsModel(model="tiny-calculator", openai_client=oai)
    agent = Agent(name="calc", instructions="Answer math questions with the calculator tool.", model=model,
                  tools=[calculator], model_settings=ModelSettings(extra_body={"seed": 0}))  # fmt: skip
    result = await Runner.run(agent, QUESTION, max_turns=4, run_config=RunConfig(tracing_disabled=True))
    await oai.close()
    check_agents_run(result.final_output)


async def test_openai_agents_runner_over_the_grpc_provider(service: Service) -> None:
    CALLS.clear()
    agent = Agent(name="calc", instructions="Answer math questions with the calculator tool.", tools=[calculator])
    config = RunConfig(model_provider=BlockPressProvider(service.address, seed=0), model="tiny-calculator",
                       tracing_disabled=True)  # fmt: skip
    result = await Runner.run(agent, QUESTION, max_turns=4, run_config=config)
    check_agents_run(result.final_output)


async def test_openai_agents_run_streamed_over_the_grpc_provider(service: Service) -> None:
    CALLS.clear()
    agent = Agent(name="calc", instructions="Answer math questions with the calculator tool.", tools=[calculator])
    config = RunConfig(model_provider=BlockPressProvider(service.address, seed=0), model="tiny-calculator",
                       tracing_disabled=True)  # fmt: skip
    streamed = Runner.run_streamed(agent, QUESTION, max_turns=4, run_config=config)
    events = [event async for event in streamed.stream_events()]
    check_agents_run(streamed.final_output)
    items = [e.item.type for e in events if isinstance(e, RunItemStreamEvent)]
    assert items[:2] == ["tool_call_item", "tool_call_output_item"] and items[-1] == "message_output_item"
    deltas = [
        e.data.delta for e in events if isinstance(e, RawResponsesStreamEvent) and e.data.type.endswith("text.delta")
    ]
    assert "".join(deltas) == streamed.final_output
    assert streamed.context_wrapper.usage.requests == 2 and streamed.context_wrapper.usage.output_tokens > 0


def check_graph(messages: list[object]) -> None:
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    tools = [m for m in messages if isinstance(m, ToolMessage)]
    expression = calls[0].tool_calls[0]["args"]["expression"] if calls else ""
    assert expression.startswith("37*41+") and tools and tools[0].content == _calculate(expression)
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and tools[0].content in str(final.content)


async def test_langgraph_agent_over_http(service: Service) -> None:
    llm = ChatOpenAI(base_url=service.base_url, api_key="none", model="tiny-calculator", seed=0, max_retries=0)
    graph = create_react_agent(llm, [lc_calculator])
    state = await graph.ainvoke({"messages": [("user", QUESTION)]})
    check_graph(state["messages"])


async def test_langgraph_agent_over_the_grpc_chat_model(service: Service) -> None:
    llm = ChatBlockPress(address=service.address, model="tiny-calculator", settings={"seed": 0})
    graph = create_react_agent(llm, [lc_calculator])
    state = await graph.ainvoke({"messages": [("user", QUESTION)]})
    check_graph(state["messages"])
    # Streaming: the tool call arrives as tool-call chunks that add up to one call.
    chunks = [c async for c in llm.bind_tools([lc_calculator]).astream(QUESTION)]
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "calculator"
    assert merged.usage_metadata is not None and merged.usage_metadata["output_tokens"] > 0
