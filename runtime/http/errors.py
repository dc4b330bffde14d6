"""The HTTP front's errors: the runtime's errors as HTTP statuses with OpenAI's (or Anthropic's) error body.

The runtime maps its errors to gRPC status codes in one place (`contracts.errors.to_status`); this
module maps those codes to HTTP statuses, so both edges answer one error the same way:

    INVALID_ARGUMENT    400 invalid_request_error, `param` names the field
    UNAUTHENTICATED     401 authentication_error
    PERMISSION_DENIED   403 permission_error
    NOT_FOUND           404 not_found_error (code model_not_found for a model)
    FAILED_PRECONDITION 409 invalid_request_error
    RESOURCE_EXHAUSTED  429 rate_limit_error, with `Retry-After` in seconds
    UNAVAILABLE         503 service_unavailable (Redis or every replica down, the gateway draining)
    DEADLINE_EXCEEDED   504 timeout_error
    anything else       500 server_error, the exception's type only (its text may hold request data)

A job that ran and failed answers with its own error code's status (a prompt the replica refused is
still a 400); one cancelled by someone else is 409, one that expired in the queue 504.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import grpc
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from blockpress.runtime.contracts.errors import (
    BlockPressError,
    InvalidArgument,
    JobCancelled,
    JobExpired,
    JobFailed,
    ModelNotFound,
    QueueFull,
    ServiceUnavailable,
    to_status,
)

__all__ = ["Flavor", "error_body", "error_response", "is_ours", "status_of"]

Flavor = Literal["openai", "anthropic"]

_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_SERVER = (500, "server_error")


def status_of(exc: BaseException) -> tuple[int, str, str]:
    """The HTTP status, the error type and the message for `exc`."""
    if isinstance(exc, RedisError | ConnectionError):
        exc = ServiceUnavailable(f"Redis is unreachable ({type(exc).__name__}); retry shortly")
    if isinstance(exc, JobFailed):
        code = grpc.StatusCode.__members__.get(exc.error_code)
        status, kind = _STATUS.get(code, _SERVER) if code is not None else _SERVER
        return status, kind, str(exc)
    if isinstance(exc, JobCancelled):
        return 409, "invalid_request_error", str(exc)
    if isinstance(exc, JobExpired):
        return 504, "timeout_error", str(exc)
    code, message, _ = to_status(exc)
    status, kind = _STATUS.get(code, _SERVER)
    return status, kind, message


def error_body(
    exc: BaseException, flavor: Flavor = "openai", *, param: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """The error body for `exc`; `param` renames a request field to the body's own name for it."""
    status, kind, message = status_of(exc)
    if flavor == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC.get(status, "api_error"), "message": message}}
    field = exc.field if isinstance(exc, InvalidArgument) else ("model" if isinstance(exc, ModelNotFound) else None)
    if field is not None and param is not None:
        field = param(field)
    code = (
        "model_not_found"
        if isinstance(exc, ModelNotFound)
        else (exc.error_code.lower() if isinstance(exc, JobFailed) else kind.removesuffix("_error"))
    )
    return {"error": {"message": message, "type": kind, "param": field, "code": code}}


_ANTHROPIC = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_response(
    exc: BaseException, flavor: Flavor = "openai", *, param: Callable[[str], str] | None = None
) -> JSONResponse:
    """`exc` as an HTTP response: its status, its body, and `Retry-After` for a full queue."""
    status, _, _ = status_of(exc)
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc, flavor, param=param), status_code=status, headers=headers)


def is_ours(exc: BaseException) -> bool:
    """Whether `exc` is an error an HTTP call answers with (rather than a bug to re-raise)."""
    return isinstance(exc, BlockPressError | RedisError | ConnectionError)
