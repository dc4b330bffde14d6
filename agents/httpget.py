"""The `http_get` tool: GET on allow-listed hosts, at their default ports, within one time limit.

Three bounds, each from the probe of issue 17: a host on the allow-list is reachable only at the
scheme's default port (443, 80) unless the operator lists it with a port (`host:port`), so an
allowed name cannot be used to reach the other services of that machine; one limit covers the
whole request (connect, headers, body), because a per-read socket timeout lets a server that
trickles bytes hold the call for ever; redirects are not followed, since they could leave the list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Collection
from typing import Any

from blockpress.agents.errors import ToolConfigError, ToolFailed
from blockpress.agents.tools import Tool

__all__ = ["http_get_tool"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def http_get(url: str) -> dict[str, Any]:
    """Fetches a URL with HTTP GET and returns its status and text.

    Args:
        url: An http or https URL on one of the hosts the operator allowed.
    """
    raise NotImplementedError  # the declaration only; `http_get_tool` binds `_fetch` to its settings


def http_get_tool(allowed_hosts: Collection[str], *, timeout: float = 10.0, max_bytes: int = 256 * 2**10) -> Tool:
    """The `http_get` tool, limited to `allowed_hosts` and http(s), each call within `timeout` seconds.

    Args:
        allowed_hosts: exact host names, reachable at the scheme's default port; `host:port` allows
            that port instead.
        timeout: the limit on the whole request, connect to last byte.
        max_bytes: the most of the body returned; past it the text is cut and `truncated` is true.

    Raises:
        ToolConfigError: an entry of `allowed_hosts` is not a host name or `host:port`.
    """
    endpoints = frozenset(_endpoint(entry) for entry in allowed_hosts)
    # A partial of a module-level function, so that calls run in the warm tool process (a closure
    # would take a fork of the replica per call).
    fetch = functools.partial(_fetch, endpoints, timeout, max_bytes)
    return dataclasses.replace(Tool.from_function(http_get), fn=fetch)


def _endpoint(entry: str) -> tuple[str, int | None]:
    host, sep, port = entry.strip().lower().rpartition(":")
    if not sep or "]" in port:  # no port, or a bare IPv6 literal
        return entry.strip().lower().strip("[]"), None
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ToolConfigError(f"http_get allowed host {entry!r} is neither a host name nor host:port")
    return host.strip("[]"), int(port)


def _fetch(endpoints: frozenset[tuple[str, int | None]], timeout: float, max_bytes: int, url: str) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        port = None
    default_port = port == _DEFAULT_PORTS.get(parts.scheme)
    allowed = ((host, None) in endpoints and default_port) or (host, port) in endpoints
    if parts.scheme not in _DEFAULT_PORTS or port is None or not allowed:
        listed = ", ".join(sorted(h if p is None else f"{h}:{p}" for h, p in endpoints))
        raise ToolFailed(f"only http(s) URLs on these hosts, at their default ports, are allowed: {listed}")
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    deadline = time.monotonic() + timeout
    # The socket timeout bounds each read; this bounds them all: at the deadline the socket is shut
    # down, which wakes a read blocked on a server that sends a byte now and then.
    connected: list[socket.socket] = []
    watchdog = threading.Timer(timeout, _cut, args=(connected,))
    watchdog.start()
    try:
        conn.connect()
        # Held here: once the response is read to the close, the connection forgets its socket.
        connected.append(conn.sock)
        if time.monotonic() >= deadline:  # the watchdog fired before there was a socket to cut
            _cut(connected)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"Accept-Encoding": "identity"})
        resp = conn.getresponse()
        status = resp.status
        body = b"" if status >= 300 else resp.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            raise ToolFailed(f"the request took longer than its limit of {timeout:g} s") from None
        raise ToolFailed(f"request failed: {exc}") from None
    finally:
        watchdog.cancel()
        watchdog.join()  # a thread left running would retire the warm tool process
        conn.close()
    if time.monotonic() >= deadline:
        raise ToolFailed(f"the request took longer than its limit of {timeout:g} s")
    if status >= 300:
        return {"status": status, "text": ""}
    text = body[:max_bytes].decode("utf-8", errors="replace")
    return {"status": status, "text": text, "truncated": len(body) > max_bytes}


def _cut(connected: list[socket.socket]) -> None:
    for sock in connected:
        # The plain socket's shutdown: SSLSocket's own would drop the TLS object under the reader.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
