"""BlockPress runtime: gateway, queue, jobs, config, telemetry, client SDK and CLI.

The SDK is what most users import:

    from blockpress.runtime import Client, AsyncClient
"""

from .client import (
    AgentResult,
    AgentToolCall,
    AsyncClient,
    AsyncJobHandle,
    Client,
    JobHandle,
    Result,
    ToolCall,
    Usage,
)
from .errors import BlockPressError, JobError
from .jobs import Event, JobState

__all__ = [
    "AgentResult",
    "AgentToolCall",
    "AsyncClient",
    "AsyncJobHandle",
    "BlockPressError",
    "Client",
    "Event",
    "JobError",
    "JobHandle",
    "JobState",
    "Result",
    "ToolCall",
    "Usage",
]
