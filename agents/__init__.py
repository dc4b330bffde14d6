"""BlockPress agents: the agent loop, tools, tool-call parsing and the sandbox.

    registry = builtin_tools()
    loop = AgentLoop(model, registry)
    result = loop.run(AgentTask.from_instructions("What is 37*41+12?", tools=("calculator",)))

The loop talks to an `AgentModel` (the engine-backed one is `blockpress.workers.agent_model`;
the scripted double is `blockpress.agents.testing`), so nothing here imports torch, ray or redis.
"""

from blockpress.agents.builtins import builtin_tools
from blockpress.agents.errors import AgentError, AgentStopped, InvalidAgentTask, ToolFailed
from blockpress.agents.ledger import InMemoryLedger, Ledger
from blockpress.agents.loop import AgentLoop
from blockpress.agents.model import AgentModel, TurnChunk
from blockpress.agents.task import AgentResult, AgentTask
from blockpress.agents.tools import Tool, ToolRegistry, tool

__all__ = [
    "AgentError",
    "AgentLoop",
    "AgentModel",
    "AgentResult",
    "AgentStopped",
    "AgentTask",
    "InMemoryLedger",
    "InvalidAgentTask",
    "Ledger",
    "Tool",
    "ToolFailed",
    "ToolRegistry",
    "TurnChunk",
    "builtin_tools",
    "tool",
]
