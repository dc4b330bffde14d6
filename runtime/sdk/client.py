"""The Python SDK: `Client` and `AsyncClient` for a BlockPress gateway.

    from blockpress.runtime import Client
    client = Client()                       # BLOCKPRESS_ADDRESS, else 127.0.0.1:50051
    print(client.generate("2+2=", max_new_tokens=32).text)
    for event in client.stream("Tell me a story"):
        print(event.type, event.data)
    answer = client.agent("What is 37*41+12?", tools=["calculator"])
    print(answer.text, answer.tool_calls)
    for span in client.trace(answer.job_id):
        print(span.name, span.duration_s)

Every job gets a job id chosen here unless the caller gives one, so a call retried after UNAVAILABLE
(a gateway restart, no replica yet) is the same job, never a second one; a broken event stream resumes
from the last event it delivered. Errors are `blockpress.runtime.contracts.errors` types carrying the status code
and the gateway's message; a job that ran and did not succeed raises a `JobError`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime._pb import runtime_pb2_grpc as pb_grpc
from blockpress.runtime.config import DEFAULT_ADDRESS
from blockpress.runtime.contracts.errors import (
    BlockPressError,
    DeadlineExceeded,
    InvalidArgument,
    JobCancelled,
    JobExpired,
    JobFailed,
    from_status,
)
from blockpress.runtime.contracts.jobs import Event, EventType, JobState, new_job_id

if TYPE_CHECKING:
    from blockpress.runtime.tracing.store import SpanRecord

__all__ = [
    "AgentResult",
    "AgentToolCall",
    "AsyncClient",
    "AsyncJobHandle",
    "Client",
    "JobHandle",
    "Result",
    "ToolCall",
    "Usage",
]

_SETTINGS = frozenset(pb.Settings.DESCRIPTOR.fields_by_name)
_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefilled_tokens: int = 0
    """Prompt tokens the encoder ran; fewer than `prompt_tokens` when a session's cache was warm."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made to one of the client's tools; the caller runs it and sends the answer back."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    """A finished generation."""

    job_id: str
    text: str
    token_ids: list[int]
    stop_reason: str
    """`stop_token` or `max_new_tokens`; with client `tools` also `tool_call` (see `tool_calls`) or
    `malformed_tool_call` (the model opened a call it did not write correctly)."""
    usage: Usage
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: queue_s, prefill_s, first_canvas_s, denoise_s, total_s."""
    canvases: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls the model made to the client's tools (a generation with `tools` only)."""


@dataclass(frozen=True, slots=True)
class AgentToolCall(ToolCall):
    """One tool call an agent made, with what the tool answered."""

    turn: int
    result: str | None = None
    """The tool's answer as the model saw it (truncated for the event stream); None if it never ran."""
    is_error: bool = False
    call_id: str = ""


@dataclass(frozen=True, slots=True)
class AgentResult(Result):
    """A finished agent task: its final answer in `text`, how it ended in `stop_reason`
    (`final_answer`, `max_turns`, `max_new_tokens`, `max_seconds`), and the calls it made."""

    turns: int = 0
    """Model turns the task took."""
    tool_calls: tuple[AgentToolCall, ...] = ()


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("BLOCKPRESS_ADDRESS") or DEFAULT_ADDRESS


def build_request(
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    model: str | None,
    job_id: str | None,
    drafts: bool,
    tools: Sequence[Mapping[str, Any]] | None,
    session_id: str | None,
    settings: Mapping[str, Any],
) -> pb.SubmitRequest:
    """A SubmitRequest; `prompt` is text, or chat messages (`{"role", "content", ...}` mappings)."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise InvalidArgument(f"settings.{unknown[0]}", f"unknown setting; known: {', '.join(sorted(_SETTINGS))}")
    task = pb.GenerationTask(drafts=drafts, session_id=session_id or "")
    if isinstance(prompt, str):
        task.prompt = prompt
    else:
        for m in prompt:
            msg = task.messages.add(role=m.get("role", ""), content=m.get("content", ""), name=m.get("name", ""))
            for call in m.get("tool_calls", ()):
                fn = call.get("function", call)
                args = fn.get("arguments", {})
                msg.tool_calls.add(name=fn["name"], arguments_json=args if isinstance(args, str) else _json(args))
    for tool in tools or ():
        fn = tool.get("function", tool)
        task.tools.add(
            name=fn["name"],
            description=fn.get("description", ""),
            parameters_json=_json(fn.get("parameters", {})),
        )
    for name, value in settings.items():
        if value is None:
            continue
        if name == "stop_token_ids":
            task.settings.stop_token_ids.extend(value)
        else:
            setattr(task.settings, name, value)
    return pb.SubmitRequest(model=model or "", job_id=job_id or new_job_id(), generation=task)


def build_agent_request(
    task: str | Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[str],
    max_turns: int | None,
    max_new_tokens: int | None,
    max_seconds: float | None,
    model: str | None,
    job_id: str | None,
    drafts: bool,
    session_id: str | None,
    settings: Mapping[str, Any],
) -> pb.SubmitRequest:
    """A SubmitRequest for an agent task; `task` is text, or chat messages to continue.

    `max_new_tokens` is the task's budget over all its turns; `settings` are the denoising settings of
    each turn (`seed`, `max_denoising_steps`, ...).
    """
    if isinstance(tools, str):  # a lone name would otherwise become one tool per character
        tools = [tools]
    generation = build_request(
        task, model=model, job_id=job_id, drafts=drafts, tools=None, session_id=session_id, settings=settings
    ).generation
    agent = pb.AgentTask(
        task=generation.prompt,
        messages=generation.messages,
        tools=list(tools),
        max_turns=max_turns or 0,
        max_new_tokens=max_new_tokens or 0,
        max_seconds=max_seconds or 0.0,
        settings=generation.settings,
        drafts=drafts,
        session_id=session_id or "",
    )
    return pb.SubmitRequest(model=model or "", job_id=job_id or new_job_id(), agent=agent)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def event_from_pb(msg: pb.JobEvent) -> Event:
    kind = msg.WhichOneof("event") or ""
    data = (
        json_format.MessageToDict(
            getattr(msg, kind), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        if kind
        else {}
    )
    if kind == "completed":  # protobuf's JSON form writes int64 as strings
        data["token_ids"] = [int(t) for t in data.get("token_ids", [])]
        data["usage"] = {k: int(v) for k, v in data.get("usage", {}).items()}
    return Event(msg.id, kind, data, msg.time)


def outcome(job_id: str, event: Event) -> Result:
    """The result of a job's final event, or the `JobError` it stands for."""
    d = event.data
    if event.type == "completed":
        usage = {k: int(v) for k, v in d.get("usage", {}).items()}
        return Result(
            job_id=job_id,
            text=d.get("text", ""),
            token_ids=list(d.get("token_ids", [])),
            stop_reason=d.get("stop_reason", ""),
            usage=Usage(**usage),
            timings=dict(d.get("timings", {})),
            canvases=int(d.get("canvases", 0)),
            tool_calls=tuple(
                ToolCall(c.get("name", ""), json.loads(c.get("arguments_json") or "{}"))
                for c in d.get("tool_calls", ())
            ),
        )
    error = d.get("error") or {}
    if event.type in ("failed", "dead_lettered"):
        state = "DEAD_LETTERED" if event.type == "dead_lettered" else "FAILED"
        raise JobFailed(job_id, error.get("code", "UNKNOWN"), error.get("message", ""), state=state)
    if event.type == "cancelled":
        raise JobCancelled(job_id, d.get("reason") or "cancelled")
    if event.type == "expired":
        raise JobExpired(job_id, "its deadline passed before it ran")
    raise BlockPressError(f"job {job_id}: unexpected final event {event.type!r}")


def job_outcome(job_id: str, events: Sequence[Event]) -> Result:
    """The result of a job from all its events: an `AgentResult` for an agent task (its events hold
    turns), else a `Result`; or the `JobError` the job ended in."""
    result = outcome(job_id, events[-1])
    if not any(e.type == EventType.TURN for e in events):
        return result
    calls: dict[str, dict[str, Any]] = {}
    turns: set[int] = set()
    for e in events:
        d = e.data
        if e.type == EventType.TURN:
            turns.add(int(d.get("index", 0)))
        elif e.type == EventType.TOOL_CALL:
            # Keyed by call id: a redelivered job re-emits a call it resumes, which is still one call.
            calls[d.get("call_id", e.id)] = {
                "turn": int(d.get("turn", 0)),
                "name": d.get("name", ""),
                "arguments": json.loads(d.get("arguments_json") or "{}"),
                "call_id": d.get("call_id", ""),
            }
        elif e.type == EventType.TOOL_RESULT and d.get("call_id", e.id) in calls:
            calls[d.get("call_id", e.id)].update(result=d.get("content", ""), is_error=bool(d.get("is_error")))
    fields = {name: getattr(result, name) for name in Result.__dataclass_fields__ if name != "tool_calls"}
    return AgentResult(**fields, turns=len(turns), tool_calls=tuple(AgentToolCall(**c) for c in calls.values()))


def spans_from_pb(trace: pb.Trace) -> list[SpanRecord]:
    """A `GetTrace` answer as the trace store's records, which `blockpress.runtime.tracing.view` renders."""
    from blockpress.runtime.tracing.store import SpanEventRecord, SpanRecord

    out = []
    for s in trace.spans:
        events = [
            SpanEventRecord(e["name"], int(e["time_ns"]), e.get("attributes", {}))
            for e in json.loads(s.events_json or "[]")
        ]
        out.append(
            SpanRecord(
                trace_id=s.trace_id,
                span_id=s.span_id,
                parent_id=s.parent_id or None,
                name=s.name,
                start_ns=s.start_ns,
                end_ns=s.end_ns,
                service=s.service,
                kind=s.kind,
                status=s.status,
                status_message=s.status_message,
                attributes=json.loads(s.attributes_json or "{}"),
                events=events,
            )
        )
    return out


def state_from_pb(value: int) -> JobState:
    return JobState(pb.JobState.Name(value).removeprefix("JOB_STATE_"))


def typed(exc: grpc.RpcError) -> BlockPressError:
    call: Any = exc
    return from_status(call.code(), call.details() or "", tuple(call.trailing_metadata() or ()))


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (0-based): exponential with full jitter, capped at 2 s."""
    return random.uniform(0, min(2.0, 0.05 * 2**attempt))


class _Deadline:
    """An overall deadline over several calls; `remaining()` is the next call's timeout."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed before the job finished")
        return left


def _request(prompt: str | Sequence[Mapping[str, Any]], kw: dict[str, Any]) -> tuple[pb.SubmitRequest, float | None]:
    """The request for `submit`/`stream`/`generate` keyword arguments, and the call's timeout."""
    timeout = kw.pop("timeout", None)
    named = {k: kw.pop(k, None) for k in ("model", "job_id", "tools", "session_id")}
    drafts = bool(kw.pop("drafts", False))
    return build_request(prompt, drafts=drafts, settings=kw, **named), timeout


def _agent_request(
    task: str | Sequence[Mapping[str, Any]], tools: Sequence[str], kw: dict[str, Any]
) -> tuple[pb.SubmitRequest, float | None]:
    """The request for `submit_agent`/`agent_stream`/`agent` keyword arguments, and the call's timeout."""
    timeout = kw.pop("timeout", None)
    named = {
        k: kw.pop(k, None) for k in ("model", "job_id", "session_id", "max_turns", "max_new_tokens", "max_seconds")
    }
    drafts = bool(kw.pop("drafts", False))
    return build_agent_request(task, tools=tools, drafts=drafts, settings=kw, **named), timeout


class Client:
    """A blocking client. Thread-safe; close it (or use `with`) to release the channel.

    Args:
        address: `host:port` of a gateway; default `BLOCKPRESS_ADDRESS`, then 127.0.0.1:50051.
        api_key: sent as `authorization: Bearer <key>` when the gateway requires keys.
        timeout: default deadline in seconds for each call; a deadline on a submit is the job's deadline.
        retries: attempts after an UNAVAILABLE answer, with exponential backoff.

    `submit`, `stream` and `generate` take the prompt (text, or chat messages as
    `{"role", "content", ...}` mappings) and the keyword arguments `model`, `job_id` (idempotency key),
    `drafts`, `tools` (OpenAI-style definitions; with chat messages), `session_id`, `timeout` (seconds;
    the job's deadline) and the denoising settings (`max_new_tokens`, `max_denoising_steps`, `t_min`,
    `t_max`, `entropy_bound`, `stability_threshold`, `confidence_threshold`, `seed`, `stop_token_ids`).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int = 5,
    ) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        self.retries = retries
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.insecure_channel(self.address)
        self._stub = pb_grpc.RuntimeStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                err = typed(exc)
                if err.code not in _RETRY_CODES or attempt == self.retries:
                    raise err from None
            time.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    def _follow(
        self, job_id: str, timeout: float | None, *, first: pb.SubmitRequest | None = None, after: str = ""
    ) -> Iterator[Event]:
        """Events of a job until its final one; a broken stream resumes after the last event seen."""
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        failures = 0
        while True:
            if first is not None and not after:  # nothing seen yet: (re)submitting is idempotent
                call = self._stub.Generate(first, timeout=deadline.remaining(), metadata=self._metadata)
            else:
                request = pb.WatchRequest(job_id=job_id, after_event_id=after)
                call = self._stub.Watch(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                for msg in call:
                    failures = 0
                    event = event_from_pb(msg)
                    after = event.id
                    yield event
                    if event.is_final:
                        return
            except grpc.RpcError as exc:
                err = typed(exc)
                if err.code not in _RETRY_CODES or failures >= self.retries:
                    raise err from None
                time.sleep(backoff(failures))
                failures += 1
                continue
            finally:
                call.cancel()
            raise BlockPressError(f"job {job_id}: the event stream ended before a final event")

    def submit(self, prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any) -> JobHandle:
        """Queues a generation and returns its handle at once."""
        request, timeout = _request(prompt, kwargs)
        reply = self._call(self._stub.Submit, request, timeout)
        return JobHandle(self, reply.job_id)

    def stream(self, prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any) -> Iterator[Event]:
        """Runs a generation and yields its events: queued, started, drafts, canvases, the final one."""
        request, timeout = _request(prompt, kwargs)
        return self._follow(request.job_id, timeout, first=request)

    def generate(self, prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any) -> Result:
        """Runs a generation to its end; returns the `Result` or raises the `JobError` it ended in."""
        request, timeout = _request(prompt, kwargs)
        *_, final = self._follow(request.job_id, timeout, first=request)
        return outcome(request.job_id, final)

    def submit_agent(
        self, task: str | Sequence[Mapping[str, Any]], *, tools: Sequence[str] = (), **kwargs: Any
    ) -> JobHandle:
        """Queues an agent task and returns its handle at once; its `result()` is an `AgentResult`."""
        request, timeout = _agent_request(task, tools, kwargs)
        reply = self._call(self._stub.Submit, request, timeout)
        return JobHandle(self, reply.job_id)

    def agent_stream(
        self, task: str | Sequence[Mapping[str, Any]], *, tools: Sequence[str] = (), **kwargs: Any
    ) -> Iterator[Event]:
        """Runs an agent task and yields its events: turns, canvases, tool calls and results, the final one."""
        request, timeout = _agent_request(task, tools, kwargs)
        return self._follow(request.job_id, timeout, first=request)

    def agent(
        self,
        task: str | Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[str] = (),
        max_turns: int | None = None,
        model: str | None = None,
        **budgets: Any,
    ) -> AgentResult:
        """Runs an agent task inside a replica until its final answer or a limit.

        Args:
            task: the task in plain words, or chat messages to continue.
            tools: names of the server's tools the agent may call (`calculator`, `python`, ...).
            max_turns: model turns before it stops with `max_turns`; None: the server's default.
            model: the model to run it on; None: the gateway's default.
            **budgets: `max_new_tokens` (over all turns), `max_seconds`, and as for `generate`:
                `job_id`, `drafts`, `session_id`, `timeout` and the denoising settings of each turn.

        Returns:
            The `AgentResult`; a task that a limit ended still returns, with that limit as `stop_reason`.

        Raises:
            JobError: the task failed, was cancelled or expired.
        """
        request, timeout = _agent_request(task, tools, {**budgets, "max_turns": max_turns, "model": model})
        events = list(self._follow(request.job_id, timeout, first=request))
        result = job_outcome(request.job_id, events)
        assert isinstance(result, AgentResult), "an agent task always starts a turn"
        return result

    def trace(self, job_id: str) -> list[SpanRecord]:
        """The spans the runtime kept for a job's trace, ordered by start time.

        Render them with `blockpress.runtime.tracing.view` (`render_text`, `render_html`). Raises
        `NotFound` when none is kept (unknown job, tracing off, or past retention).
        """
        return spans_from_pb(self._call(self._stub.GetTrace, pb.GetTraceRequest(job_id=job_id), None))

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        return JobHandle(self, job_id)

    def get_job(self, job_id: str) -> pb.Job:
        """The job's record (state, attempt, result or error)."""
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), None)

    def cancel(self, job_id: str) -> JobState:
        """Asks a job to stop; raises `JobFinished` when it has already ended."""
        return state_from_pb(self._call(self._stub.Cancel, pb.CancelRequest(job_id=job_id), None).state)

    def models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(), None).models)


class JobHandle:
    """A submitted job: its id, its state, its events and its result."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    def status(self) -> JobState:
        return state_from_pb(self._client.get_job(self.job_id).state)

    def events(self, *, after: str = "", timeout: float | None = None) -> Iterator[Event]:
        """The job's events after `after` (from the first when empty) until its final one."""
        return self._client._follow(self.job_id, timeout, after=after)

    def result(self, timeout: float | None = None) -> Result:
        """Waits for the job's end: the `Result` (an `AgentResult` for an agent task), a `JobError`, or
        `DeadlineExceeded` (the job goes on)."""
        return job_outcome(self.job_id, list(self.events(timeout=timeout)))

    def cancel(self) -> JobState:
        """Asks the job to stop; raises `JobFinished` when it has already ended."""
        return self._client.cancel(self.job_id)


class AsyncClient:
    """The asyncio twin of `Client`, on a `grpc.aio` channel; same arguments."""

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int = 5,
    ) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        self.retries = retries
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = pb_grpc.RuntimeStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                err = typed(exc)
                if err.code not in _RETRY_CODES or attempt == self.retries:
                    raise err from None
            await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    async def _follow(
        self, job_id: str, timeout: float | None, *, first: pb.SubmitRequest | None = None, after: str = ""
    ) -> AsyncIterator[Event]:
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        failures = 0
        while True:
            if first is not None and not after:
                call = self._stub.Generate(first, timeout=deadline.remaining(), metadata=self._metadata)
            else:
                request = pb.WatchRequest(job_id=job_id, after_event_id=after)
                call = self._stub.Watch(request, timeout=deadline.remaining(), metadata=self._metadata)
            try:
                async for msg in call:
                    failures = 0
                    event = event_from_pb(msg)
                    after = event.id
                    yield event
                    if event.is_final:
                        return
            except grpc.RpcError as exc:
                err = typed(exc)
                if err.code not in _RETRY_CODES or failures >= self.retries:
                    raise err from None
                await asyncio.sleep(backoff(failures))
                failures += 1
                continue
            finally:
                call.cancel()
            raise BlockPressError(f"job {job_id}: the event stream ended before a final event")

    async def submit(self, prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any) -> AsyncJobHandle:
        request, timeout = _request(prompt, kwargs)
        reply = await self._call(self._stub.Submit, request, timeout)
        return AsyncJobHandle(self, reply.job_id)

    def stream(self, prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any) -> AsyncIterator[Event]:
        request, timeout = _request(prompt, kwargs)
        return self._follow(request.job_id, timeout, first=request)

    async def generate(self, prompt: str | Sequence[Mapping[str, Any]], **kwargs: Any) -> Result:
        request, timeout = _request(prompt, kwargs)
        final = None
        async for event in self._follow(request.job_id, timeout, first=request):
            final = event
        assert final is not None
        return outcome(request.job_id, final)

    async def submit_agent(
        self, task: str | Sequence[Mapping[str, Any]], *, tools: Sequence[str] = (), **kwargs: Any
    ) -> AsyncJobHandle:
        request, timeout = _agent_request(task, tools, kwargs)
        reply = await self._call(self._stub.Submit, request, timeout)
        return AsyncJobHandle(self, reply.job_id)

    def agent_stream(
        self, task: str | Sequence[Mapping[str, Any]], *, tools: Sequence[str] = (), **kwargs: Any
    ) -> AsyncIterator[Event]:
        request, timeout = _agent_request(task, tools, kwargs)
        return self._follow(request.job_id, timeout, first=request)

    async def agent(
        self,
        task: str | Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[str] = (),
        max_turns: int | None = None,
        model: str | None = None,
        **budgets: Any,
    ) -> AgentResult:
        request, timeout = _agent_request(task, tools, {**budgets, "max_turns": max_turns, "model": model})
        events = [e async for e in self._follow(request.job_id, timeout, first=request)]
        result = job_outcome(request.job_id, events)
        assert isinstance(result, AgentResult), "an agent task always starts a turn"
        return result

    async def trace(self, job_id: str) -> list[SpanRecord]:
        return spans_from_pb(await self._call(self._stub.GetTrace, pb.GetTraceRequest(job_id=job_id), None))

    def job(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self, job_id)

    async def get_job(self, job_id: str) -> pb.Job:
        return await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), None)

    async def cancel(self, job_id: str) -> JobState:
        return state_from_pb((await self._call(self._stub.Cancel, pb.CancelRequest(job_id=job_id), None)).state)

    async def models(self) -> list[pb.ModelInfo]:
        return list((await self._call(self._stub.ListModels, pb.ListModelsRequest(), None)).models)


class AsyncJobHandle:
    """The asyncio twin of `JobHandle`."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.job_id!r})"

    async def status(self) -> JobState:
        return state_from_pb((await self._client.get_job(self.job_id)).state)

    def events(self, *, after: str = "", timeout: float | None = None) -> AsyncIterator[Event]:
        return self._client._follow(self.job_id, timeout, after=after)

    async def result(self, timeout: float | None = None) -> Result:
        return job_outcome(self.job_id, [e async for e in self.events(timeout=timeout)])

    async def cancel(self) -> JobState:
        return await self._client.cancel(self.job_id)
