"""The blocking SDK: `Client` and `JobHandle`, each call an `AsyncClient` call on a private event loop.

    from blockpress.runtime import Client
    client = Client()                       # BLOCKPRESS_ADDRESS, else 127.0.0.1:50051
    print(client.generate("2+2=", max_new_tokens=32).text)
    for event in client.stream("Tell me a story"):
        print(event.type, event.data)
    answer = client.agent("What is 37*41+12?", tools=["calculator"])
    print(answer.text, answer.tool_calls)

The loop runs in a daemon thread of the client's own, so a `Client` works the same inside or outside
a running event loop and from many threads at once; the logic (retries, resuming a stream, results)
is the `AsyncClient`'s alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from blockpress.runtime.contracts.errors import BlockPressError
from blockpress.runtime.contracts.jobs import Event, JobState
from blockpress.runtime.convert import Prompt
from blockpress.runtime.sdk.aio import AsyncClient, AsyncJobHandle
from blockpress.runtime.sdk.records import Job, ModelInfo
from blockpress.runtime.sdk.results import AgentResult, Result

# Relative, unlike the rest: mypy checks this folder as `runtime`, where an absolute import of
# `blockpress.runtime` resolves to Any, and `Unpack` needs to see the TypedDicts themselves.
from .options import AgentOptions, ConnectOptions, GenerateOptions

if TYPE_CHECKING:
    from blockpress.runtime.tracing.store import SpanRecord

__all__ = ["Client", "JobHandle"]

_T = TypeVar("_T")


class _Loop:
    """An event loop in a daemon thread, and blocking ways into it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blockpress-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # A KeyboardInterrupt while waiting must not leave the call running on the loop.
            future.cancel()
            raise

    def iterate(self, items: AsyncIterator[_T]) -> Iterator[_T]:
        """`items` as a blocking iterator; leaving it early closes `items` (and so its gRPC call)."""
        try:
            while batch := self.run(_next(items)):
                yield batch[0]
        finally:
            if self.is_open and isinstance(items, AsyncGenerator):
                self.run(items.aclose())

    @property
    def is_open(self) -> bool:
        return not self._loop.is_closed()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _next(items: AsyncIterator[_T]) -> tuple[_T, ...]:
    """The next item alone, or nothing at the end: a StopAsyncIteration cannot cross the future."""
    try:
        return (await anext(items),)
    except StopAsyncIteration:
        return ()


class Client:
    """A blocking client of a BlockPress gateway. Thread-safe; close it (or use `with`) to release it.

    Takes the same arguments, and its methods the same keyword arguments, as `AsyncClient`: the prompt
    (text, or chat messages as `{"role", "content", ...}` mappings), the denoising settings
    (`max_new_tokens`, `max_denoising_steps`, `t_min`, `t_max`, `entropy_bound`, `stability_threshold`,
    `confidence_threshold`, `seed`, `stop_token_ids`) and `model`, `job_id` (idempotency key), `drafts`,
    `tools` (OpenAI-style definitions; with chat messages), `session_id`, `timeout` (seconds; the job's
    deadline).

    Args:
        address: `host:port` of a gateway; default `BLOCKPRESS_ADDRESS`, then 127.0.0.1:50051.
        api_key: sent as `authorization: Bearer <key>` when the gateway requires keys.
        timeout: default deadline in seconds for each call; a deadline on a submit is the job's deadline.
        retries: at most this many attempts after UNAVAILABLE answers; None: as many as `retry_s` allows.
        retry_s: seconds a call keeps retrying UNAVAILABLE (default 30), with backoff.
        tls: connect over TLS, checking the gateway's certificate against the system's roots.
        credentials: the channel's TLS credentials (`grpc.ssl_channel_credentials(...)`); implies TLS.
    """

    def __init__(self, address: str | None = None, **options: Unpack[ConnectOptions]) -> None:
        self._loop = _Loop()

        async def open_client() -> AsyncClient:  # on the loop: a grpc.aio channel belongs to one loop
            return AsyncClient(address, **options)

        self._aio = self._loop.run(open_client())
        self.address = self._aio.address

    def close(self) -> None:
        if self._loop.is_open:
            self._loop.run(self._aio.close())
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> JobHandle:
        """Queues a generation and returns its handle at once."""
        return JobHandle(self, self._loop.run(self._aio.submit(prompt, **options)).job_id)

    def submit_many(
        self, prompts: Iterable[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[JobHandle | BlockPressError]:
        """Queues a generation per prompt in few calls; each job's handle or its error, in order
        (`AsyncClient.submit_many`)."""
        outcomes = self._loop.run(self._aio.submit_many(prompts, **options))
        return [JobHandle(self, o.job_id) if isinstance(o, AsyncJobHandle) else o for o in outcomes]

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Iterator[Event]:
        """Runs a generation and yields its events: queued, started, drafts, canvases, the final one."""
        return self._loop.iterate(self._aio.stream(prompt, **options))

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Result:
        """Runs a generation to its end; returns the `Result` or raises the `JobError` it ended in."""
        return self._loop.run(self._aio.generate(prompt, **options))

    def submit_agent(self, task: Prompt, *, tools: Sequence[str] = (), **options: Unpack[AgentOptions]) -> JobHandle:
        """Queues an agent task and returns its handle at once; its `result()` is an `AgentResult`."""
        return JobHandle(self, self._loop.run(self._aio.submit_agent(task, tools=tools, **options)).job_id)

    def agent_stream(
        self, task: Prompt, *, tools: Sequence[str] = (), **options: Unpack[AgentOptions]
    ) -> Iterator[Event]:
        """Runs an agent task and yields its events: turns, canvases, tool calls and results, the final one."""
        return self._loop.iterate(self._aio.agent_stream(task, tools=tools, **options))

    def agent(self, task: Prompt, *, tools: Sequence[str] = (), **options: Unpack[AgentOptions]) -> AgentResult:
        """Runs an agent task inside a replica until its final answer or a limit (`AsyncClient.agent`)."""
        return self._loop.run(self._aio.agent(task, tools=tools, **options))

    def trace(self, job_id: str) -> list[SpanRecord]:
        """The spans the runtime kept for a job's trace, ordered by start time (`AsyncClient.trace`)."""
        return self._loop.run(self._aio.trace(job_id))

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        return JobHandle(self, job_id)

    def get_job(self, job_id: str) -> Job:
        """The job's record: state, attempt, times, and its result or error."""
        return self._loop.run(self._aio.get_job(job_id))

    def cancel(self, job_id: str) -> JobState:
        """Asks a job to stop; raises `JobFinished` when it has already ended."""
        return self._loop.run(self._aio.cancel(job_id))

    def models(self) -> list[ModelInfo]:
        """The models the gateway serves, with their live replicas and queue depth."""
        return self._loop.run(self._aio.models())


class JobHandle:
    """A submitted job: its id, its state, its events and its result."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._loop = client._loop
        self._handle = AsyncJobHandle(client._aio, job_id)
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    def status(self) -> JobState:
        return self._loop.run(self._handle.status())

    def events(self, *, after: str = "", timeout: float | None = None) -> Iterator[Event]:
        """The job's events after `after` (from the first when empty) until its final one."""
        return self._loop.iterate(self._handle.events(after=after, timeout=timeout))

    def result(self, timeout: float | None = None) -> Result:
        """Waits for the job's end: the `Result` (an `AgentResult` for an agent task), a `JobError`, or
        `DeadlineExceeded` (the job goes on)."""
        return self._loop.run(self._handle.result(timeout))

    def cancel(self) -> JobState:
        """Asks the job to stop; raises `JobFinished` when it has already ended."""
        return self._loop.run(self._handle.cancel())
