"""BlockPress's server-side agent tasks over HTTP: `POST /v1/blockpress/agent`.

The body is an agent task as the SDK's `Client.agent` sends it over gRPC (task or OpenAI-style
messages, the names of the server's tools, budgets, denoising settings as extra fields); the answer is
the task's `AgentResult` as JSON, or with `"stream": true` the job's events as they happen, one
server-sent event each (`{"object": "blockpress.agent.event", "id", "type", "data"}`: turns, canvases,
tool calls and results, drafts when asked for, and the final one), then `[DONE]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from blockpress.runtime.contracts.jobs import Event, JobSpec
from blockpress.runtime.http import protocol as p
from blockpress.runtime.http.chat import messages_of
from blockpress.runtime.http.jobs import settings_from_extra
from blockpress.runtime.sdk.results import AgentResult, job_outcome, outcome

__all__ = ["agent_param", "events", "result", "submit_body"]


def submit_body(req: p.AgentRequest, *, job_id: str) -> dict[str, Any]:
    """The plain request `validate_submit` checks, for an agent task."""
    task = {
        "task": req.task,
        "messages": messages_of(req.messages or ()),
        "tools": list(req.tools),
        "max_turns": req.max_turns or 0,
        "max_new_tokens": req.max_new_tokens or 0,
        "max_seconds": req.max_seconds or 0.0,
        "settings": settings_from_extra(req.model_extra),
        "drafts": req.drafts,
        "session_id": req.session_id or "",
    }
    return {"model": req.model, "job_id": job_id, "agent": task}


def agent_param(field: str) -> str:
    """A `validate_submit` field path as the body's name for it (`agent.settings.t_min` -> `t_min`)."""
    if field == "job_id":
        return "Idempotency-Key"
    return field.removeprefix("agent.settings.").removeprefix("agent.")


async def result(spec: JobSpec, events: AsyncIterator[Event]) -> dict[str, Any]:
    """The finished task as JSON; raises the `JobError` a task that did not succeed ended in."""
    seen = [e async for e in events]
    done = job_outcome(spec.job_id, seen)
    body = dataclasses.asdict(done)
    body.pop("token_ids", None)
    if not isinstance(done, AgentResult):  # a task that ended before its first turn
        body["turns"] = 0
    return {"id": spec.job_id, "object": "blockpress.agent.result", "model": spec.model, **body}


async def events(source: AsyncIterator[Event]) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
    """The task's events as server-sent events; a final event other than `completed` raises its error."""
    async for event in source:
        if event.is_final:
            outcome("", event)  # raises for failed, cancelled, expired and dead-lettered tasks
        yield None, {"object": "blockpress.agent.event", "id": event.id, "type": event.type, "data": event.data}
