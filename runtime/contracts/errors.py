"""Errors of the runtime (gateway, queue, SDK), sorted by who must act, and their gRPC status codes.

    BlockPressError
    ├── RequestError             the caller must change the request
    │   ├── InvalidArgument      INVALID_ARGUMENT: names the field and the reason
    │   │   └── InvalidSettings  a denoising setting out of range (the field is the setting's name)
    │   ├── NotFound             NOT_FOUND
    │   │   ├── ModelNotFound
    │   │   ├── JobNotFound
    │   │   └── TraceNotFound
    │   ├── JobFinished          FAILED_PRECONDITION: cancelling a job that has already ended
    │   ├── JobIdConflict        ALREADY_EXISTS: a job id reused for a different request
    │   └── Unauthenticated      UNAUTHENTICATED: API keys are configured and none or a wrong one came
    ├── QueueFull                RESOURCE_EXHAUSTED: the caller should retry after `retry_after_s`
    │   └── TooManyStreams       one client holds the most open streams it may
    ├── ServiceUnavailable       UNAVAILABLE: Redis or every replica is down, or the gateway is draining
    ├── DeadlineExceeded         DEADLINE_EXCEEDED: the call's deadline passed before the answer
    ├── ConfigurationError       the operator must act (bad setting, redis-server not installed)
    └── JobError                 the job ran and did not succeed (SDK only, never a status code)
        ├── JobFailed            FAILED or DEAD_LETTERED, with the job's error code and message
        ├── JobCancelled
        └── JobExpired

This module is the one place that maps exceptions to gRPC status codes: `to_status` on the server,
`from_status` in the SDK. (A replica maps the engine's and the agent layer's errors to the code a
job's `failed` event carries in `blockpress.workers.errors.error_code`.)

Every status carries the standard rich error model, so generic clients read it
(`grpc_status.rpc_status.from_call`): a `google.rpc.Status` in `grpc-status-details-bin` with an
`ErrorInfo` (reason: the class name in UPPER_SNAKE, domain `blockpress`, metadata `error`: the class
name), a `BadRequest` field violation for `InvalidArgument`, and a `RetryInfo` for `QueueFull`. The
same facts travel in the older trailers too (`blockpress-error`, `blockpress-field`,
`retry-after-ms`), which `from_status` still reads when the details are absent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "BlockPressError",
    "ConfigurationError",
    "DeadlineExceeded",
    "InvalidArgument",
    "InvalidSettings",
    "JobCancelled",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobFinished",
    "JobIdConflict",
    "JobNotFound",
    "ModelNotFound",
    "NotFound",
    "QueueFull",
    "RequestError",
    "ServiceUnavailable",
    "TooManyStreams",
    "TraceNotFound",
    "Unauthenticated",
    "from_rpc_status",
    "from_status",
    "status_code",
    "to_rpc_status",
    "to_status",
]

ERROR_KEY = "blockpress-error"
RETRY_AFTER_KEY = "retry-after-ms"
FIELD_KEY = "blockpress-field"
DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "blockpress"
"""The `ErrorInfo.domain` of every error the runtime answers with."""


class BlockPressError(Exception):
    """Base class of the runtime's errors; `code` is the gRPC status code, `message` the server's text."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class RequestError(BlockPressError):
    """The caller sent something the runtime will not run; retrying the same request will not help."""


class InvalidArgument(RequestError, ValueError):
    """A request field is missing, malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidSettings(InvalidArgument):
    """A denoising setting is unknown or out of range; `field` is the setting's name."""


class NotFound(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    def __init__(self, model: str, known: Sequence[str] = ()) -> None:
        served = ", ".join(known) if known else "none"
        super().__init__(f"model: unknown model {model!r}; this gateway serves: {served}")
        self.model = model


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job_id: no job {job_id!r}")
        self.job_id = job_id


class TraceNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job_id: no trace kept for {job_id!r} (unknown job, tracing off, or past retention)")
        self.job_id = job_id


class JobFinished(RequestError):
    """The job has already reached a final state, so it cannot be cancelled."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job_id: job {job_id!r} has already ended ({state}); nothing to cancel")
        self.job_id = job_id
        self.state = state


class JobIdConflict(RequestError):
    """A client-chosen job id already names a job whose request differs from this one."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"job_id: {job_id!r} already names a job with a different request; "
            "resubmit the same request to rejoin it, or choose a new job id"
        )
        self.job_id = job_id


class Unauthenticated(RequestError):
    code = grpc.StatusCode.UNAUTHENTICATED


class QueueFull(BlockPressError):
    """The model's queue is at its bound; the same request may succeed after `retry_after_s`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        self.retry_after_s = max(0.0, float(retry_after_s))
        hint = f"retry after {self.retry_after_s * 1000:.0f} ms"
        super().__init__(f"{message}; {hint}" if message else f"the queue is full; {hint}")


class TooManyStreams(QueueFull):
    """The client already holds `limit` open event streams; one must end before another opens."""

    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        super().__init__(
            retry_after_s,
            f"this client already holds {limit} open Generate/Watch streams, the most one client may "
            "(max_streams_per_client); close one",
        )
        self.limit = limit


class ServiceUnavailable(BlockPressError):
    """A part the runtime needs is down (Redis, every replica) or the gateway is draining; retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BlockPressError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigurationError(BlockPressError):
    """The operator must fix the deployment: a bad setting, a missing program, an unusable checkpoint."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class JobError(BlockPressError):
    """The job was accepted and ran, but did not succeed; `job_id` and `state` say which and how."""

    code = grpc.StatusCode.OK
    state = ""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id} {self.state}: {self.message}"


class JobFailed(JobError):
    """The job failed (or was dead-lettered); `error_code` is the job's error code."""

    state = "FAILED"

    def __init__(self, job_id: str, error_code: str, message: str, *, state: str = "FAILED") -> None:
        super().__init__(job_id, f"{error_code}: {message}")
        self.error_code = error_code
        self.state = state


class JobCancelled(JobError):
    state = "CANCELLED"


class JobExpired(JobError):
    state = "EXPIRED"


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status a gateway answers with for `exc`: its own code, or INTERNAL for what is not ours."""
    return exc.code if isinstance(exc, BlockPressError) else grpc.StatusCode.INTERNAL


def _reason(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _rich(code: grpc.StatusCode, message: str, exc: BaseException) -> status_pb2.Status:
    """The `google.rpc.Status` for `exc`, as `grpc-status-details-bin` carries it serialized."""
    name = type(exc).__name__ if isinstance(exc, BlockPressError) else "InternalError"
    details: list[Message] = [
        error_details_pb2.ErrorInfo(reason=_reason(name), domain=DOMAIN, metadata={"error": name})
    ]
    if isinstance(exc, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.reason)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(exc, QueueFull):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(exc.retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The status code, details and trailing metadata a gateway answers with for `exc`.

    Anything that is not one of ours is a bug in the runtime: INTERNAL, with the
    exception's type but not its text, which may hold request data. The trailers hold the rich
    `google.rpc.Status` (`grpc-status-details-bin`) and the older `blockpress-*` keys.
    """
    code = status_code(exc)
    trailers: list[tuple[str, str | bytes]] = []
    if isinstance(exc, BlockPressError):
        message = exc.message
        trailers.append((ERROR_KEY, type(exc).__name__))
    elif code is grpc.StatusCode.INTERNAL:
        message = f"internal error ({type(exc).__name__}); see the gateway's log"
    else:
        message = str(exc)
    if isinstance(exc, QueueFull):
        trailers.append((RETRY_AFTER_KEY, str(round(exc.retry_after_s * 1000))))
    if isinstance(exc, InvalidArgument):
        trailers.append((FIELD_KEY, exc.field))
    trailers.append((DETAILS_KEY, _rich(code, message, exc).SerializeToString()))
    return code, message, tuple(trailers)


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """The `google.rpc.Status` a gateway answers with for `exc` (`to_status`'s code, message and rich
    details), for a message that carries an error of its own, such as a SubmitMany result."""
    code, message, _ = to_status(exc)
    return _rich(code, message, exc)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_rpc_status(status: status_pb2.Status) -> BlockPressError:
    """The typed error for a `google.rpc.Status` carried in a message (`to_rpc_status`'s inverse)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return from_status(code, status.message, ((DETAILS_KEY, status.SerializeToString()),))


_BY_NAME: dict[str, type[BlockPressError]] = {
    cls.__name__: cls
    for cls in (
        InvalidArgument,
        ModelNotFound,
        JobNotFound,
        TraceNotFound,
        JobFinished,
        JobIdConflict,
        Unauthenticated,
        QueueFull,
        TooManyStreams,
        ServiceUnavailable,
        DeadlineExceeded,
        ConfigurationError,
    )
}
_BY_CODE: dict[grpc.StatusCode, type[BlockPressError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: JobFinished,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.ALREADY_EXISTS: JobIdConflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFull,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_status(
    code: grpc.StatusCode, message: str, trailers: Sequence[tuple[str, str | bytes]] = ()
) -> BlockPressError:
    """The typed error for a status the gateway answered with; keeps its code and message.

    Reads the rich `google.rpc.Status` details when they came, else the older `blockpress-*` trailers.
    """
    rich = next((v for k, v in trailers if k == DETAILS_KEY and isinstance(v, bytes)), None)
    meta = {k: v if isinstance(v, str) else v.decode(errors="replace") for k, v in trailers if k != DETAILS_KEY}
    if rich is not None:
        meta.update(_details_meta(rich))
    cls = _BY_NAME.get(meta.get(ERROR_KEY, "")) or _BY_CODE.get(code, BlockPressError)
    # Built without __init__: the server already wrote the full message, and the fields it was made
    # from are not all on the wire.
    err = cls.__new__(cls)
    BlockPressError.__init__(err, message)
    if cls.code is not code:
        err.code = code
    if isinstance(err, QueueFull):
        err.retry_after_s = int(meta.get(RETRY_AFTER_KEY, "1000")) / 1000
    if isinstance(err, InvalidArgument):
        err.field = meta.get(FIELD_KEY) or message.partition(":")[0]
        err.reason = message.partition(": ")[2] or message
    return err


def _details_meta(raw: bytes) -> dict[str, str]:
    """What the rich status details say, under the keys of the older trailers."""
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except DecodeError:
        return {}  # not ours or damaged: the older trailers and the code still say enough
    meta: dict[str, str] = {}
    for detail in status.details:
        info, bad, retry = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        if detail.Unpack(info) and info.domain == DOMAIN and info.metadata.get("error"):
            meta[ERROR_KEY] = info.metadata["error"]
        elif detail.Unpack(bad) and bad.field_violations:
            meta[FIELD_KEY] = bad.field_violations[0].field
        elif detail.Unpack(retry):
            meta[RETRY_AFTER_KEY] = str(retry.retry_delay.ToMilliseconds())
    return meta
