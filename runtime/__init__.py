"""BlockPress runtime: gateway, queue, jobs, config, telemetry, client SDK and CLI.

The SDK is what most users import:

    from blockpress.runtime import Client, AsyncClient
"""

from blockpress.runtime.contracts.errors import BlockPressError, JobError
from blockpress.runtime.contracts.jobs import Event, JobState
from blockpress.runtime.sdk.client import (
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
