"""The HTTP front's ASGI app (FastAPI): routes that translate a body to a job and the job back.

    GET  /health                  open: "ok" or "draining"
    GET  /v1/models[/{id}]        the served models with their context length
    POST /v1/chat/completions     OpenAI chat completions (`chat.py`)
    POST /v1/messages             Anthropic messages (`anthropic.py`)
    POST /v1/blockpress/agent     a server-side agent task (`agent.py`)

Every `/v1` route needs one of the gateway's API keys when keys are set, as `Authorization: Bearer
<key>` (or Anthropic's `x-api-key`). A body over `max_request_bytes` is refused with 413 unparsed.
Each request gets one SERVER span, `gateway.<Operation>`, parented on the caller's `traceparent`,
current while the job is admitted, so the job's spans join its trace. An `Idempotency-Key` header is
the job id. A streamed answer is an async generator of server-sent events; a client that disconnects
(streamed or not) cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blockpress.runtime.contracts.errors import BlockPressError, InvalidArgument, Unauthenticated
from blockpress.runtime.contracts.jobs import new_job_id
from blockpress.runtime.http import agent, anthropic, chat
from blockpress.runtime.http import protocol as p
from blockpress.runtime.http.errors import Flavor, error_body, error_response, is_ours
from blockpress.runtime.http.jobs import Queued, follow, submit
from blockpress.runtime.http.limits import BodyLimit
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.telemetry import extract_context, get_tracer

if TYPE_CHECKING:
    from blockpress.runtime.gateway.server import Gateway

__all__ = ["build_app"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# OpenTelemetry's HTTP semantic conventions, beside the rpc.* keys gRPC calls carry.
_HTTP_METHOD = "http.request.method"
_HTTP_ROUTE = "http.route"
_HTTP_STATUS = "http.response.status_code"
_OPERATIONS = {
    "/v1/chat/completions": "ChatCompletions",
    "/v1/messages": "Messages",
    "/v1/blockpress/agent": "Agent",
    "/v1/models": "Models",
}
_SPAN_KEY = "blockpress.span"
SSE = Callable[[], AsyncIterator[tuple[str | None, Mapping[str, Any] | BaseModel]]]


def build_app(gateway: Gateway, *, tracer: trace.Tracer | None = None) -> ASGIApp:
    """The ASGI app over `gateway`: its admission, queue, API keys and tracer."""
    app = FastAPI(title="BlockPress", docs_url=None, redoc_url=None, openapi_url=None)
    keys = tuple(k.encode() for k in gateway.settings.api_key_values())

    def authorize(request: Request) -> None:
        if not keys:
            return
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization") or ""
        if bearer.startswith("Bearer "):
            given = bearer.removeprefix("Bearer ").strip()
        # Compared against every key in constant time, as the gRPC handlers do.
        if not any([hmac.compare_digest(given.encode(), k) for k in keys]):
            raise Unauthenticated("authorization: send 'Authorization: Bearer <API key>' with a valid key")

    def job_id(request: Request) -> str:
        return request.headers.get("idempotency-key") or new_job_id()

    def markers(model: str) -> list[str]:
        return list(getattr(gateway.cards[model].tokenizer, "all_special_tokens", ()))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "draining" if gateway.draining else "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> p.ModelList:
        authorize(request)
        return p.ModelList(data=[_card(gateway, name) for name in gateway.cards])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> p.ModelCardOut:
        authorize(request)
        if model_id not in gateway.cards:
            from blockpress.runtime.contracts.errors import ModelNotFound

            raise ModelNotFound(model_id, sorted(gateway.cards))
        return _card(gateway, model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        authorize(request)
        places: dict[str, str] = {}
        session = request.headers.get("x-session-id")
        raw = chat.submit_body(body, job_id=job_id(request), session_header=session, places=places)
        job = await _admitted(request, gateway, raw, lambda field: chat.openai_param(field, places))
        turn = chat.ChatTurn(body, job.spec, markers(job.spec.model))
        if body.stream:
            return _stream(lambda: ((None, c) async for c in turn.chunks(follow(gateway, job))), done=True)
        return _json(await _until_disconnect(request, turn.completion(follow(gateway, job))))

    @app.post("/v1/messages")
    async def messages(body: p.AnthropicRequest, request: Request) -> Response:
        authorize(request)
        places: dict[str, str] = {}
        session = request.headers.get("x-session-id")
        raw = anthropic.submit_body(body, job_id=job_id(request), session_header=session, places=places)
        job = await _admitted(request, gateway, raw, lambda field: anthropic.anthropic_param(field, places))
        turn = anthropic.MessageTurn(body, job.spec, markers(job.spec.model))
        if body.stream:
            return _stream(lambda: turn.events(follow(gateway, job)), flavor="anthropic")
        return JSONResponse(await _until_disconnect(request, turn.message(follow(gateway, job))))

    @app.post("/v1/blockpress/agent")
    async def agent_task(body: p.AgentRequest, request: Request) -> Response:
        authorize(request)
        job = await _admitted(request, gateway, agent.submit_body(body, job_id=job_id(request)), agent.agent_param)
        if body.stream:
            return _stream(lambda: agent.events(follow(gateway, job)), done=True)
        return JSONResponse(await _until_disconnect(request, agent.result(job.spec, follow(gateway, job))))

    def flavor_of(request: Request) -> Flavor:
        return "anthropic" if request.url.path.startswith("/v1/messages") else "openai"

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "malformed request body"}
        field = _path(tuple(first.get("loc", ()))) or "body"
        return error_response(InvalidArgument(field, str(first.get("msg", ""))), flavor_of(request))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {
            "error": {
                "message": f"{request.method} {request.url.path}: {exc.detail}",
                "type": kind,
                "param": None,
                "code": kind.removesuffix("_error"),
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has gone

    async def our_error(request: Request, exc: Exception) -> Response:
        return error_response(exc, flavor_of(request))

    # Registered by type, not only under `Exception`: Starlette re-raises what its catch-all handler
    # answered (for the server to log it), and a refused request is no server error.
    for kind in (BlockPressError, RedisError, ConnectionError):
        app.add_exception_handler(kind, our_error)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> Response:
        if not is_ours(exc):
            log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(exc, flavor_of(request))

    return _Tracing(BodyLimit(app, gateway.settings.max_request_bytes), tracer)


def _card(gateway: Gateway, name: str) -> p.ModelCardOut:
    card = gateway.cards[name]
    return p.ModelCardOut(
        id=card.name,
        context_length=card.context_length,
        max_model_len=card.context_length,
        canvas_length=card.canvas_length,
    )


async def _admitted(request: Request, gateway: Gateway, raw: Mapping[str, Any], param: Callable[[str], str]) -> Queued:
    """The queued job of `raw`; a field in an error is renamed to the body's name for it."""
    # The request's own span is made current again: FastAPI may run the route under a span of its own,
    # outside this trace, and the job must join the caller's trace.
    span = request.scope.get(_SPAN_KEY, trace.get_current_span())
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        job = await submit(gateway, raw)
    except InvalidArgument as exc:
        raise InvalidArgument(param(exc.field), exc.reason) from None
    finally:
        otel_context.detach(token)
    span.set_attribute(Attr.JOB_ID, job.spec.job_id)
    return job


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-")) and part not in ("str", "list[...]"):
            out = f"{out}.{part}" if out else str(part)
    return out


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


class _ClientGone(Exception):
    pass


async def _until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """`work`'s result, or, when the client disconnects first, `work` cancelled (and with it the job)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _stream(items: SSE, *, done: bool = False, flavor: Flavor = "openai") -> Response:
    """Server-sent events of `items()`: `(event name or None, body)`; an error ends the stream with its body."""

    async def body() -> AsyncIterator[str]:
        try:
            async for name, data in items():
                text = data.model_dump_json(exclude_none=True) if isinstance(data, BaseModel) else json.dumps(data)
                yield (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
        except Exception as exc:
            if not is_ours(exc):
                log.error("internal error in an event stream", exc_info=exc)
            error = error_body(exc, flavor)
            yield ("event: error\n" if flavor == "anthropic" else "") + f"data: {json.dumps(error)}\n\n"
        if done:
            yield "data: [DONE]\n\n"

    return _EventStream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _EventStream(StreamingResponse):
    """A stream that stops the moment its client disconnects, not at its next write.

    Starlette on ASGI 2.4 servers notices a disconnect only when a write fails, and a job waiting in
    the queue writes nothing for a long time; its job would run on for nobody.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def respond() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(respond)
            await _disconnected(receive)
            group.cancel_scope.cancel()


class _Tracing:
    """One SERVER span per request, current while the route runs (and so while its job is admitted)."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer | None) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        # Only the trace headers are read; the authorization header is never copied anywhere.
        carrier = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in (b"traceparent", b"tracestate")}
        parent = extract_context(carrier)
        path = scope["path"]
        route = next((r for r in _OPERATIONS if path == r or path.startswith(r + "/")), path)
        attributes = {_HTTP_METHOD: scope["method"], _HTTP_ROUTE: route}
        tracer = self.tracer or get_tracer()
        span = tracer.start_span(
            SpanName.gateway(_OPERATIONS.get(route, "HTTP")),
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                span.set_attribute(_HTTP_STATUS, message["status"])
                if message["status"] >= 500:
                    span.set_status(trace.StatusCode.ERROR)
            await send(message)

        scope[_SPAN_KEY] = span
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, sending)
        finally:
            otel_context.detach(token)
            span.end()
