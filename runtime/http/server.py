"""`HttpServer`: the HTTP front served by uvicorn inside the gateway's asyncio loop, beside grpc.aio.

The gateway starts it after gRPC and stops it first on drain: uvicorn stops accepting, gives open
requests the drain time, then cancels them (a cancelled stream cancels its job). uvicorn's own signal
handling is off: the process's entry point owns SIGTERM and drains the whole gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from opentelemetry import trace

from blockpress.runtime.http.app import build_app

if TYPE_CHECKING:
    from blockpress.runtime.gateway.server import Gateway

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The gateway's entry point handles SIGTERM/SIGINT; uvicorn would replace its handlers.
        yield


class HttpServer:
    """The HTTP front of one gateway, on `host:port` (port 0 picks a free one; `port` tells which).

    Args:
        gateway: the gateway whose admission, queue, keys and models the routes use.
        host: interface to listen on.
        port: TCP port; 0 picks a free one.
        tracer: where request spans go; default the global BlockPress tracer.
    """

    def __init__(self, gateway: Gateway, *, host: str, port: int, tracer: trace.Tracer | None = None) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(
            build_app(gateway, tracer=tracer),
            lifespan="off",
            log_config=None,  # the entry point configures logging
            access_log=False,
            timeout_graceful_shutdown=int(gateway.settings.drain_s),
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds and serves; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.set_inheritable(True)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP API (OpenAI-compatible) on http://%s:%d/v1", self.host, self.port)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops accepting, gives open requests `grace` seconds, then cancels what is left."""
        if self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(0, int(grace))
        self._server.should_exit = True
        if grace <= 0:
            self._server.force_exit = True
        await self._task
        self._task = None
