"""The queue's Lua scripts and the helpers that read their replies.

Every script is `lua/_common.lua` followed by its own file; all of them get the same six keys (the
job's record and events, the model's stream, queued set, dead letters and deadlines) and the same
first three arguments (now, retention, group), so `_common.lua`'s helpers mean the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from blockpress.runtime.contracts.events import Cancelled, DeadLettered, ErrorInfo, Expired, Failed, Payload, to_data
from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.queue.claim import Claim

__all__ = ["NAMES", "final_event_data", "fingerprint", "job_of", "script", "text"]

NAMES = ("submit", "start", "heartbeat", "append", "finish", "cancel", "expire")
"""The scripts a `JobQueue` registers, by file name without `.lua`."""


def script(name: str) -> str:
    """The source of script `name`: the shared helpers, then the script itself."""
    folder = resources.files(__package__).joinpath("lua")
    return folder.joinpath("_common.lua").read_text() + "\n" + folder.joinpath(f"{name}.lua").read_text()


_NOT_THE_REQUEST = frozenset({"deadline", "trace_context", "submitted_at"})
"""Spec fields that differ between two sends of one request (the call's clock and trace)."""


def fingerprint(spec: JobSpec) -> str:
    """A hash of what the client asked for, so that a job id reused for another request is told apart.

    Canonical JSON (sorted keys, no spaces) of the spec without the fields a retry of the same call
    changes; the job id and model are part of it.
    """
    data = {k: v for k, v in spec.to_dict().items() if k not in _NOT_THE_REQUEST}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def text(value: Any) -> str:
    """A reply value as str; works with clients made with and without decode_responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def job_of(fields: Any) -> str:
    """The job id of a model-stream entry's fields."""
    return text(fields.get(b"job") or fields.get("job"))


def final_event_data(
    state: JobState, claim: Claim, result: dict[str, Any] | None, error: dict[str, str] | None
) -> dict[str, Any]:
    """The data of the final event a state implies, when the writer gives none."""
    if state is JobState.SUCCEEDED:
        return dict(result or {})
    info = ErrorInfo(**error) if error else ErrorInfo(message="failed")
    payload: Payload
    if state is JobState.FAILED:
        payload = Failed(error=info, attempt=claim.attempt)
    elif state is JobState.CANCELLED:
        payload = Cancelled(reason="cancelled by the client")
    elif state is JobState.EXPIRED:
        payload = Expired(deadline=claim.spec.deadline)
    else:
        payload = DeadLettered(error=info, deliveries=claim.deliveries)
    return to_data(payload)[1]
