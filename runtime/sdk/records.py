"""What the SDK returns besides results: a served model (`ModelInfo`) and a job's record (`Job`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blockpress.runtime.contracts.jobs import JobState
from blockpress.runtime.sdk.results import Result

__all__ = ["Job", "ModelInfo"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the gateway serves, with its limits and its queue right now."""

    name: str
    context_length: int
    """Tokens of prompt plus new tokens the model can attend to."""
    canvas_length: int
    """Tokens denoised together; new tokens are reserved in whole canvases."""
    dtype: str
    """bfloat16, float32, ... or the quantization scheme when the experts are quantized."""
    replicas_live: int
    """Replicas whose heartbeat is fresh."""
    queue_depth: int
    """Jobs waiting in the model's queue."""
    max_queue: int
    """Admission bound: submits past this many waiting jobs get `QueueFull`."""


@dataclass(frozen=True, slots=True)
class Job:
    """A job's record as the gateway reports it (`Client.get_job`)."""

    job_id: str
    model: str
    kind: str
    """`generate` or `agent`."""
    state: JobState
    attempt: int
    """Runs started so far; 0 before the first start."""
    submitted_at: float
    """Epoch seconds."""
    deadline: float | None = None
    """Epoch seconds; None when the job has no deadline."""
    replica: str | None = None
    """The replica of the latest attempt."""
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    result: Result | None = None
    """Set once SUCCEEDED. An agent task's record holds its final answer, not its calls: read those from
    `JobHandle.result()`."""
    error: Mapping[str, str] | None = None
    """`{code, message}` once FAILED or DEAD_LETTERED; while queued again, the last attempt's error."""
