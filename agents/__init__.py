"""BlockPress agents: the agent loop, tools, tool-call parsing and the sandbox.

    registry = builtin_tools()
    loop = AgentLoop(model, registry)
    result = loop.run(AgentTask.from_instructions("What is 37*41+12?", tools=("calculator",)))

The loop talks to an `AgentModel` (the engine-backed one is `blockpress.agents.engine_model`;
the scripted double is `blockpress.agents.testing`), so nothing here imports torch, ray or redis.
"""

from .builtins import builtin_tools
from .errors import AgentError, AgentStopped, InvalidAgentTask, ToolFailed
from .job import run_agent_job
from .ledger import InMemoryLedger, Ledger
from .loop import AgentLoop
from .model import AgentModel, TurnChunk
from .task import AgentResult, AgentTask
from .tools import Tool, ToolRegistry, tool

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
    "run_agent_job",
    "tool",
]
