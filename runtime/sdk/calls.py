"""What every SDK call shares: its overall deadline, the backoff between retries, typed errors."""

from __future__ import annotations

import random
import time
from typing import Any

import grpc

from blockpress.runtime.contracts.errors import BlockPressError, DeadlineExceeded, from_status

__all__ = ["Deadline", "backoff", "left", "typed"]


def typed(exc: grpc.RpcError) -> BlockPressError:
    call: Any = exc
    return from_status(call.code(), call.details() or "", tuple(call.trailing_metadata() or ()))


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (0-based): exponential with full jitter, capped at 2 s."""
    return random.uniform(0, min(2.0, 0.05 * 2**attempt))


def left(deadline: Deadline, unreachable: BlockPressError | None) -> float | None:
    """The next try's timeout; past the deadline after failed tries, the last failure is the answer."""
    try:
        return deadline.remaining()
    except DeadlineExceeded:
        if unreachable is not None:
            raise unreachable from None
        raise


class Deadline:
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

    def allows(self, wait_s: float) -> bool:
        """Whether a retry after `wait_s` would still start before the deadline."""
        return self.at is None or time.monotonic() + wait_s < self.at
