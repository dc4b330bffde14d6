"""Open event streams per client: `StreamCap`, so one client cannot hold every stream a gateway serves.

A client is its API key when it sent one (kept as a digest, never the key), else its peer address
without the port: a process that opens many connections is still one client.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterator

import grpc

from blockpress.runtime.contracts.errors import TooManyStreams

__all__ = ["StreamCap", "client_of"]


def client_of(context: grpc.aio.ServicerContext) -> str:
    """Who a call is from, for per-client limits."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return "key:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0] or address
    return f"{kind}:{address}"


class StreamCap:
    """Counts open streams per client and refuses one past `per_client` with `TooManyStreams`."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: Counter[str] = Counter()

    def open(self, client: str) -> int:
        return self._open[client]

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """A stream of `client` for the block's duration; raises `TooManyStreams` when it has its fill."""
        if self._open[client] >= self.per_client:
            raise TooManyStreams(self.per_client)
        self._open[client] += 1
        try:
            yield
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]
