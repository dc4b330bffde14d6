"""What every HTTP route shares: a request becomes a job through the gateway, and a job's events come back.

An HTTP body is converted (`chat.py`, `anthropic.py`, `agent.py`) to the plain request that
`gateway.validation.validate_submit` checks for gRPC too, then admitted by `Gateway.admit_data` and
queued; nothing here validates a second time. `follow` reads the job's events and cancels the job
when its reader goes away first (a client that disconnected).

Sessions: a chat request names its KV-cache session with `session_id` (extension field),
`prompt_cache_key` (OpenAI's field for the same purpose) or an `X-Session-Id` header; without one it is
derived from the conversation's start (the messages up to the first user message, and the tools), so a
framework that sends the whole conversation again each turn lands on the cache its previous turn left.
Two conversations that start alike share a session id; the replica reuses a cache only where the new
prompt begins with exactly the cached tokens, so that costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from blockpress.runtime.contracts.errors import JobFinished, JobNotFound
from blockpress.runtime.contracts.jobs import Event, JobSpec
from blockpress.runtime.contracts.settings import DenoiseSettings

if TYPE_CHECKING:
    from blockpress.runtime.gateway.server import Gateway

__all__ = [
    "SETTING_NAMES",
    "Queued",
    "TextCut",
    "derive_session",
    "follow",
    "session_key",
    "settings_from_extra",
    "submit",
]

log = logging.getLogger(__name__)

SETTING_NAMES = frozenset(DenoiseSettings.__dataclass_fields__) - {"extra"}
"""Denoising settings a body may carry as extra fields, by `DenoiseSettings`' names."""


class Queued(NamedTuple):
    spec: JobSpec
    created: bool
    """False when the job id named a job already (a retried request): its spec is that job's."""


async def submit(gateway: Gateway, raw: Mapping[str, Any]) -> Queued:
    """Admits `raw` (the plain request `validate_submit` takes) and queues it; the same job id twice is
    one job, so a retried request with the same `Idempotency-Key` follows the first."""
    spec = await gateway.admit_data(raw)
    record, created = await gateway.queue.submit(spec)
    log.info("job %s %s for model %s (http)", spec.job_id, "accepted" if created else "rejoined", spec.model)
    return Queued(spec if created else record.spec, created)


async def follow(gateway: Gateway, job: Queued) -> AsyncIterator[Event]:
    """The job's events from its first to its final one; a reader that stops early cancels the job."""
    final, job_id = False, job.spec.job_id
    try:
        # A job this request created is followed without the catch-up read and record check.
        async for event in gateway.follow(job_id, "0", fresh=job.created):
            final = event.is_final
            yield event
    finally:
        if not final:
            # Shielded: this runs while the reader's task is being cancelled (the client went away).
            await asyncio.shield(_cancel(gateway, job_id))


async def _cancel(gateway: Gateway, job_id: str) -> None:
    with contextlib.suppress(JobFinished, JobNotFound):
        await gateway.queue.cancel(job_id)
        log.info("job %s cancelled: its HTTP client went away", job_id)


def settings_from_extra(extra: Mapping[str, Any] | None, **named: Any) -> dict[str, Any]:
    """The denoising settings among a body's extra fields, with `named` ones (None skipped) over them.

    Other unknown fields are ignored: clients send fields of newer API versions (`store`, `metadata`,
    `parallel_tool_calls`, ...) that have no meaning here.
    """
    out = {k: v for k, v in (extra or {}).items() if k in SETTING_NAMES}
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def derive_session(model: str, messages: Sequence[Mapping[str, Any]], tools: Iterable[Any]) -> str:
    """A session id from the conversation's start: the messages up to its first user message, and the tools."""
    head: list[Any] = []
    for message in messages:
        head.append(message)
        if message.get("role") == "user":
            break
    text = json.dumps([model, head, list(tools)], sort_keys=True, separators=(",", ":"), default=_digest)
    return "http-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _digest(value: Any) -> str:
    # An image's bytes count by their hash: their repr would be several times their size.
    return hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else str(value)


def session_key(value: str) -> str:
    """A client's session name as a valid session id (any text: OpenAI's `prompt_cache_key` is free-form)."""
    return "key-" + hashlib.sha256(value.encode()).hexdigest()[:40]


class TextCut:
    """The visible text of a model turn as it streams: cut at the first stop string or special marker.

    Each `feed` returns the text that may be shown now; a tail that could still become a stop string or
    marker is held back until the next piece tells. The engine's text keeps the checkpoint's special
    tokens (`<turn|>`, `<|tool_call>`): the turn's visible text ends at the first of them, and a tool
    call after it comes back parsed, as `tool_calls`.

    Args:
        stops: the client's stop strings (`stop`, `stop_sequences`).
        markers: the special tokens of the model's tokenizer.
    """

    def __init__(self, stops: Iterable[str], markers: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._cuts = tuple(dict.fromkeys((*self.stops, *(m for m in markers if m))))
        self._pending = ""
        self.done = False
        self.stopped_by: str | None = None
        """The stop string that ended the text, if one did (not a marker)."""

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        text = self._pending + text
        hit = min(((i, s) for s in self._cuts if (i := text.find(s)) >= 0), default=None)
        if hit is not None:
            self.done = True
            self._pending = ""
            if hit[1] in self.stops:
                self.stopped_by = hit[1]
            return text[: hit[0]]
        hold = max((_overlap(text, s) for s in self._cuts), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What is held back, once the turn has ended."""
        out, self._pending = ("" if self.done else self._pending), ""
        self.done = True
        return out

    def whole(self, text: str) -> str:
        """The visible part of a finished turn's text."""
        return self.feed(text) + self.flush()


def _overlap(text: str, cut: str) -> int:
    """Length of the longest end of `text` that is a proper start of `cut`."""
    for n in range(min(len(cut) - 1, len(text)), 0, -1):
        if text.endswith(cut[:n]):
            return n
    return 0
