"""The SDK's keyword arguments, typed: denoising settings and the options of a call.

`Client.generate(prompt, max_new_tokens=64, seed=0, timeout=30)` is checked by a type checker and
completed by an IDE through these TypedDicts (`**options: Unpack[GenerateOptions]`); at run time an
unknown name is refused as `InvalidArgument` on `settings.<name>` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import grpc

__all__ = ["AgentOptions", "CallOptions", "ConnectOptions", "GenerateOptions", "Settings"]


class Settings(TypedDict, total=False):
    """Denoising settings (`blockpress.runtime.contracts.settings.DenoiseSettings`); None or absent: the
    checkpoint's default."""

    max_new_tokens: int | None
    """Upper bound on new tokens; for an agent task, the budget over all its turns."""
    max_denoising_steps: int | None
    """Step limit per canvas; the adaptive stop usually ends a canvas well before it."""
    t_min: float | None
    """Temperature at the last step of the linear schedule."""
    t_max: float | None
    """Temperature at the first step of the linear schedule."""
    entropy_bound: float | None
    """Entropy budget for accepting the most confident positions in one step; higher accepts more."""
    stability_threshold: int | None
    """Steps the argmax canvas must stay unchanged before a canvas may stop early."""
    confidence_threshold: float | None
    """Mean entropy under which a stable canvas stops early; 0 disables the early stop."""
    seed: int | None
    """Seed for every random draw of the generation; the same seed gives the same output."""
    stop_token_ids: Sequence[int] | None
    """Tokens that end the generation; default: the checkpoint's end-of-sequence tokens."""


class CallOptions(TypedDict, total=False):
    """What every job call takes besides its prompt and settings."""

    model: str | None
    """The model to run on; None: the gateway's default."""
    job_id: str | None
    """Idempotency key: the same id submitted twice is one job. None: one is chosen for the call."""
    drafts: bool
    """Also stream `draft` events while a canvas is denoised."""
    session_id: str | None
    """Keeps a conversation's KV cache warm on a replica across jobs."""
    timeout: float | None
    """Seconds for the whole call, and the job's deadline; None: the client's default."""


class GenerateOptions(Settings, CallOptions, total=False):
    """The keyword arguments of `generate`, `stream` and `submit`."""

    tools: Sequence[Mapping[str, Any]] | None
    """Client-side tool definitions (OpenAI style); with chat messages only."""


class AgentOptions(Settings, CallOptions, total=False):
    """The keyword arguments of `agent`, `agent_stream` and `submit_agent`."""

    max_turns: int | None
    """Model turns before the task stops with `max_turns`; None: the server's default."""
    max_seconds: float | None
    """Wall-time budget of the task; None: the server's default."""


class ConnectOptions(TypedDict, total=False):
    """The keyword arguments of a client (`AsyncClient`, `Client`) besides its address."""

    api_key: str | None
    """Sent as `authorization: Bearer <key>` when the gateway requires keys."""
    timeout: float | None
    """Default deadline in seconds for each call; a deadline on a submit is the job's deadline."""
    retries: int | None
    """At most this many attempts after UNAVAILABLE answers; None (default): as many as `retry_s` allows."""
    retry_s: float
    """Seconds a call keeps retrying UNAVAILABLE, with backoff (default 30: rides out a Redis or gateway
    restart); a stream's budget starts again at each event."""
    tls: bool
    """Connect over TLS, checking the gateway's certificate against the system's roots (default False)."""
    credentials: grpc.ChannelCredentials | None
    """TLS credentials of the channel (`grpc.ssl_channel_credentials(root_certificates=...)` for a private
    CA or a client certificate); given, the channel is TLS whatever `tls` says."""
