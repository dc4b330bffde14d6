"""Agent-framework adapters over the gRPC SDK, each an optional extra that imports its framework only
when used: `openai_agents.py` (`pip install blockpress[openai-agents]`: a model provider for the OpenAI
Agents SDK) and `langchain.py` (`pip install blockpress[langchain]`: a LangChain chat model).
`from blockpress.runtime import Client` loads none of them.
"""
