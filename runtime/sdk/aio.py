"""The Python SDK's implementation: `AsyncClient` and `AsyncJobHandle` on a `grpc.aio` channel.

    from blockpress.runtime import AsyncClient
    async with AsyncClient() as client:     # BLOCKPRESS_ADDRESS, else 127.0.0.1:50051
        result = await client.generate("2+2=", max_new_tokens=32)
        async for event in client.stream("Tell me a story"):
            print(event.type, event.data)

Every job gets a job id chosen here unless the caller gives one, so a call retried after UNAVAILABLE
(a gateway restart, no replica yet) is the same job, never a second one; a broken event stream resumes
from the last event it delivered, and what a re-run attempt sends again is dropped (`replay.py`).
Errors are `blockpress.runtime.contracts.errors` types carrying the status code and the gateway's
message (read from the rich `google.rpc.Status` details); a job that ran and did not succeed raises a `JobError`.
`Client` (`sync.py`) is this client behind blocking calls.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import grpc

from blockpress.runtime import convert
from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.config import DEFAULT_ADDRESS
from blockpress.runtime.contracts.errors import BlockPressError, InvalidArgument
from blockpress.runtime.contracts.jobs import Event, JobState
from blockpress.runtime.convert import Prompt
from blockpress.runtime.sdk.records import Job, ModelInfo
from blockpress.runtime.sdk.results import AgentResult, Result, job_outcome, outcome

# Relative, unlike the rest: mypy checks this folder as `runtime`, where an absolute import of
# `blockpress.runtime` resolves to Any, and `Unpack` needs to see the TypedDicts themselves.
from . import many
from .calls import Deadline, backoff, left, typed
from .options import AgentOptions, CallOptions, GenerateOptions
from .replay import ReplayFilter

if TYPE_CHECKING:
    from blockpress.runtime.tracing.store import SpanRecord

__all__ = ["AsyncClient", "AsyncJobHandle", "resolve_address"]

_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)
_T = TypeVar("_T")


def resolve_address(address: str | None) -> str:
    """`address`, else `BLOCKPRESS_ADDRESS`, else the local default."""
    return address or os.environ.get("BLOCKPRESS_ADDRESS") or DEFAULT_ADDRESS


_GENERATION_NAMED = frozenset(CallOptions.__annotations__) | {"tools"}
_AGENT_NAMED = frozenset(CallOptions.__annotations__) | {"max_turns", "max_seconds", "max_new_tokens"}


def _generation_call(prompt: Prompt, options: Mapping[str, Any]) -> tuple[pb.SubmitRequest, float | None]:
    """The request for a generation call's keyword arguments, and the call's timeout."""
    named, settings = _split(options, _GENERATION_NAMED)
    timeout = named.pop("timeout", None)
    return convert.generation_request(prompt, settings=settings, **named), timeout


def _agent_call(
    task: Prompt, tools: Sequence[str], options: Mapping[str, Any]
) -> tuple[pb.SubmitRequest, float | None]:
    """The request for an agent call's keyword arguments, and the call's timeout."""
    named, settings = _split(options, _AGENT_NAMED)
    timeout = named.pop("timeout", None)
    return convert.agent_request(task, tools=tools, settings=settings, **named), timeout


def _split(options: Mapping[str, Any], named: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    # What is not a call option is a setting: `convert.settings_to_pb` refuses the names it does not know.
    calls = {k: v for k, v in options.items() if k in named}
    return calls, {k: v for k, v in options.items() if k not in named}


class AsyncClient:
    """A client of a BlockPress gateway, for asyncio. Close it (or use `async with`) to release the channel.

    Args:
        address: `host:port` of a gateway; default `BLOCKPRESS_ADDRESS`, then 127.0.0.1:50051.
        api_key: sent as `authorization: Bearer <key>` when the gateway requires keys.
        timeout: default deadline in seconds for each call; a deadline on a submit is the job's deadline.
        retries: at most this many attempts after UNAVAILABLE answers; None: as many as `retry_s` allows.
        retry_s: seconds a call keeps retrying UNAVAILABLE (a Redis or gateway restart, no replica yet),
            with exponential backoff and jitter; a stream's budget starts again at each event it gets.
        tls: connect over TLS, checking the gateway's certificate against the system's roots.
        credentials: the channel's TLS credentials (a private CA's roots, a client certificate); given,
            the channel is TLS whatever `tls` says.

    The job calls take the prompt (text, or chat messages as `{"role", "content", ...}` mappings) and
    keyword arguments: the denoising settings and the call's options (`options.GenerateOptions`,
    `options.AgentOptions`).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry_s: float = 30.0,
        tls: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        self.retries = retries
        self.retry_s = retry_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        # Reconnect soon after a gateway restart: gRPC's default backoff grows to 120 s, far past
        # `retry_s`, so a call retried in time would still find the channel waiting.
        options = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
        if credentials is None and tls:
            credentials = grpc.ssl_channel_credentials()  # the system's roots
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
        self._stub = pb_grpc.RuntimeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncJobHandle:
        """Queues a generation and returns its handle at once."""
        request, timeout = _generation_call(prompt, options)
        reply = await self._call(self._stub.Submit, request, timeout)
        return AsyncJobHandle(self, reply.job_id)

    async def submit_many(
        self, prompts: Iterable[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[AsyncJobHandle | BlockPressError]:
        """Queues a generation per prompt, all with the same `options`, in few calls (`many.py`).

        Returns, in the order of `prompts`, each job's handle or the error its submit met (a full
        queue, a prompt over the limits), as `asyncio.gather(..., return_exceptions=True)` would: one
        refused prompt does not lose the others. Each job gets an id of its own, so `job_id` is
        refused; `timeout` bounds the whole call and is every job's deadline.
        """
        if options.get("job_id"):
            raise InvalidArgument("job_id", "names one job; submit_many gives each job an id of its own")
        if isinstance(prompts, str):
            raise InvalidArgument("prompts", "is one prompt; pass a list of prompts, or call submit")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, Mapping):
                raise InvalidArgument(f"prompts[{i}]", "is one chat message; a chat prompt is a list of messages")
        calls = [_generation_call(prompt, options) for prompt in prompts]
        outcomes = await many.submit_all(self, [request for request, _ in calls], options.get("timeout"))
        return [AsyncJobHandle(self, o) if isinstance(o, str) else o for o in outcomes]

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncIterator[Event]:
        """Runs a generation and yields its events: queued, started, drafts, canvases, the final one."""
        request, timeout = _generation_call(prompt, options)
        return self._follow(request.job_id, timeout, first=request)

    async def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Result:
        """Runs a generation to its end; returns the `Result` or raises the `JobError` it ended in."""
        request, timeout = _generation_call(prompt, options)
        try:
            # One unary reply with the final event: no message per event to write and read on the way.
            final = convert.event_from_pb(await self._call(self._stub.Run, request, timeout))
        except BlockPressError as err:
            if err.code is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            # A gateway older than Run (a rolling upgrade): the event stream ends the same way.
            async for event in self._follow(request.job_id, timeout, first=request):
                final = event
        return outcome(request.job_id, final)

    async def submit_agent(
        self, task: Prompt, *, tools: Sequence[str] = (), **options: Unpack[AgentOptions]
    ) -> AsyncJobHandle:
        """Queues an agent task and returns its handle at once; its `result()` is an `AgentResult`."""
        request, timeout = _agent_call(task, tools, options)
        reply = await self._call(self._stub.Submit, request, timeout)
        return AsyncJobHandle(self, reply.job_id)

    def agent_stream(
        self, task: Prompt, *, tools: Sequence[str] = (), **options: Unpack[AgentOptions]
    ) -> AsyncIterator[Event]:
        """Runs an agent task and yields its events: turns, canvases, tool calls and results, the final one."""
        request, timeout = _agent_call(task, tools, options)
        return self._follow(request.job_id, timeout, first=request)

    async def agent(self, task: Prompt, *, tools: Sequence[str] = (), **options: Unpack[AgentOptions]) -> AgentResult:
        """Runs an agent task inside a replica until its final answer or a limit.

        Args:
            task: the task in plain words, or chat messages to continue.
            tools: names of the server's tools the agent may call (`calculator`, `python`, ...).
            **options: `max_turns`, `max_new_tokens` (over all turns), `max_seconds`, `model`, `job_id`,
                `drafts`, `session_id`, `timeout` and the denoising settings of each turn.

        Returns:
            The `AgentResult`; a task that a limit ended still returns, with that limit as `stop_reason`.

        Raises:
            JobError: the task failed, was cancelled or expired.
        """
        request, timeout = _agent_call(task, tools, options)
        events = [e async for e in self._follow(request.job_id, timeout, first=request)]
        result = job_outcome(request.job_id, events)
        assert isinstance(result, AgentResult), "an agent task always starts a turn"
        return result

    async def trace(self, job_id: str) -> list[SpanRecord]:
        """The spans the runtime kept for a job's trace, ordered by start time.

        Render them with `blockpress.runtime.tracing.view.render_text` or `.page.render_html`. Raises
        `NotFound` when none is kept (unknown job, tracing off, or past retention).
        """
        return convert.spans_from_pb(await self._call(self._stub.GetTrace, pb.GetTraceRequest(job_id=job_id)))

    def job(self, job_id: str) -> AsyncJobHandle:
        """A handle on an existing job."""
        return AsyncJobHandle(self, job_id)

    async def get_job(self, job_id: str) -> Job:
        """The job's record: state, attempt, times, and its result or error."""
        return convert.job_from_pb(await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)))

    async def cancel(self, job_id: str) -> JobState:
        """Asks a job to stop; raises `JobFinished` when it has already ended."""
        job = await self._call(self._stub.Cancel, pb.CancelRequest(job_id=job_id))
        return convert.state_from_pb(job.state)

    async def models(self) -> list[ModelInfo]:
        """The models the gateway serves, with their live replicas and queue depth."""
        reply = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [convert.model_info_from_pb(m) for m in reply.models]

    def _may_retry(self, err: BlockPressError, failures: int, since: float) -> bool:
        """Whether a call that failed `failures` times in a row, the first at `since`, tries again."""
        if err.code not in _RETRY_CODES or (self.retries is not None and failures > self.retries):
            return False
        return time.monotonic() - since < self.retry_s

    async def _call(self, method: Callable[..., Awaitable[_T]], request: Any, timeout: float | None = None) -> _T:
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        since = time.monotonic()
        attempt = 0
        unreachable: BlockPressError | None = None
        while True:
            try:
                return await method(request, timeout=left(deadline, unreachable), metadata=self._metadata)
            except grpc.RpcError as exc:
                err = typed(exc)
                if err.code is grpc.StatusCode.DEADLINE_EXCEEDED and unreachable is not None:
                    raise unreachable from None  # the deadline ran out while the gateway was unreachable
                if err.code in _RETRY_CODES:
                    unreachable = err
                attempt += 1
                # Out of budget or of deadline: the caller learns why the last try failed (the gateway
                # is unreachable), not that its deadline ran out while the SDK retried.
                if not self._may_retry(err, attempt, since) or not deadline.allows(backoff(attempt - 1)):
                    raise err from None
            await asyncio.sleep(backoff(attempt - 1))

    async def _follow(
        self, job_id: str, timeout: float | None, *, first: pb.SubmitRequest | None = None, after: str = ""
    ) -> AsyncIterator[Event]:
        """Events of a job until its final one; a broken stream resumes after the last event seen."""
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        failures, since = 0, time.monotonic()
        replays = ReplayFilter()  # a re-run attempt's canvases were shown already
        while True:
            if first is not None and not after:  # nothing seen yet: (re)submitting is idempotent
                call = self._stub.Generate(first, timeout=deadline.remaining(), metadata=self._metadata)
            else:
                request = pb.WatchRequest(job_id=job_id, after_event_id=after)
                call = self._stub.Watch(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                async for msg in call:
                    failures, since = 0, time.monotonic()
                    event = convert.event_from_pb(msg)
                    after = event.id
                    if replays.keep(event):
                        yield event
                    if event.is_final:
                        return
            except grpc.RpcError as exc:
                err = typed(exc)
                failures += 1
                if not self._may_retry(err, failures, since) or not deadline.allows(backoff(failures - 1)):
                    raise err from None
                await asyncio.sleep(backoff(failures - 1))
                continue
            finally:
                call.cancel()
            raise BlockPressError(f"job {job_id}: the event stream ended before a final event")


class AsyncJobHandle:
    """A submitted job: its id, its state, its events and its result."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.job_id!r})"

    async def status(self) -> JobState:
        return (await self._client.get_job(self.job_id)).state

    def events(self, *, after: str = "", timeout: float | None = None) -> AsyncIterator[Event]:
        """The job's events after `after` (from the first when empty) until its final one."""
        return self._client._follow(self.job_id, timeout, after=after)

    async def result(self, timeout: float | None = None) -> Result:
        """Waits for the job's end: the `Result` (an `AgentResult` for an agent task), a `JobError`, or
        `DeadlineExceeded` (the job goes on)."""
        return job_outcome(self.job_id, [e async for e in self.events(timeout=timeout)])

    async def cancel(self) -> JobState:
        """Asks the job to stop; raises `JobFinished` when it has already ended."""
        return await self._client.cancel(self.job_id)
