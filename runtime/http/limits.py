"""`BodyLimit`: the HTTP front's request-size limit, the one gRPC has (`RuntimeSettings.max_request_bytes`).

A body over the limit is answered 413 with OpenAI's error body (Anthropic's on `/v1/messages`) before
any of it is parsed: on its declared `Content-Length` at once, and, for a chunked body that declares
none, as soon as the bytes read pass the limit. A body within it is read whole here and replayed to
the app (the routes parse JSON, which needs all of it anyway).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "too_large_body"]


def too_large_body(limit: int, *, anthropic: bool) -> dict[str, Any]:
    """The 413 error body, in OpenAI's shape or Anthropic's."""
    message = f"the request body is over the gateway's limit of {limit} bytes (BLOCKPRESS_MAX_REQUEST_BYTES)"
    if anthropic:
        return {"type": "error", "error": {"type": "request_too_large", "message": message}}
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "request_too_large"}}


class BodyLimit:
    """ASGI middleware refusing request bodies over `limit` bytes.

    Args:
        app: the app it guards.
        limit: the largest body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body arrived: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: the disconnect the routes watch for
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = too_large_body(self.limit, anthropic=scope["path"].startswith("/v1/messages"))
        await JSONResponse(body, status_code=413)(scope, receive, send)
