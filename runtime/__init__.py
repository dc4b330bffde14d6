"""BlockPress runtime: gateway, queue, jobs, config, telemetry, client SDK and CLI.

The SDK is what most users import:

    from blockpress.runtime import Client, AsyncClient
"""

from blockpress.runtime.contracts.errors import BlockPressError, JobError
from blockpress.runtime.contracts.jobs import Event, JobState
from blockpress.runtime.sdk.aio import AsyncClient, AsyncJobHandle
from blockpress.runtime.sdk.records import Job, ModelInfo
from blockpress.runtime.sdk.results import AgentResult, AgentToolCall, Result, ToolCall, Usage
from blockpress.runtime.sdk.sync import Client, JobHandle

__all__ = [
    "AgentResult",
    "AgentToolCall",
    "AsyncClient",
    "AsyncJobHandle",
    "BlockPressError",
    "Client",
    "Event",
    "Job",
    "JobError",
    "JobHandle",
    "JobState",
    "ModelInfo",
    "Result",
    "ToolCall",
    "Usage",
]
