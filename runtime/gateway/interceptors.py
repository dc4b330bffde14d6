"""The gateway's gRPC server interceptors: one span per call, and API keys.

Both wrap the handler of a call and leave health checking and reflection alone when they are not
part of the service they guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from blockpress.runtime.contracts.errors import Unauthenticated, to_status
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.telemetry import extract_context, get_tracer

__all__ = ["AuthInterceptor", "TracingInterceptor", "record_status"]


def record_status(code: grpc.StatusCode) -> None:
    """Puts the call's status code on the gateway span (the interceptor cannot see an abort's code)."""
    trace.get_current_span().set_attribute(Attr.RPC_GRPC_STATUS_CODE, code.value[0])


def _wrap(handler: grpc.RpcMethodHandler, around: Any) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour run inside the async context manager `around(context)`."""
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    inner_us = handler.unary_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with around(context):
            async for item in inner_us(request, context):
                yield item

    return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """One span per call of `service`, `gateway.<Method>`, parented on the caller's W3C headers."""

    def __init__(self, service: str, tracer: trace.Tracer | None = None) -> None:
        self.prefix = f"/{service}/"
        self.tracer = tracer

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.removeprefix(self.prefix)
        # Only text headers can carry trace context; the authorization header is never copied anywhere.
        carrier = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str) and k != "authorization"}
        attributes = {
            Attr.RPC_SYSTEM: "grpc",
            Attr.RPC_SERVICE: self.prefix.strip("/"),
            Attr.RPC_METHOD: method,
            Attr.RPC_GRPC_STATUS_CODE: 0,
        }
        tracer = self.tracer or get_tracer()
        name = SpanName.gateway(method)
        parent = extract_context(carrier)

        def start() -> tuple[trace.Span, Any]:
            span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
            return span, trace.set_span_in_context(span, parent)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                span, ctx = start()
                token = otel_context.attach(ctx)
                try:
                    return await inner_uu(request, context)
                finally:
                    otel_context.detach(token)
                    span.end()

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        inner_us = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            span, ctx = start()
            items = inner_us(request, context)
            try:
                while True:
                    # Current only while the servicer runs: gRPC may close a cancelled stream from
                    # another context, where a context token taken across a yield cannot be detached.
                    token = otel_context.attach(ctx)
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield item
            except asyncio.CancelledError:  # the client went away
                span.set_attribute(Attr.RPC_GRPC_STATUS_CODE, grpc.StatusCode.CANCELLED.value[0])
                raise
            finally:
                await items.aclose()
                span.end()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` with one of `keys` on the calls of service `protected`.

    Health and reflection stay open: probes and grpcurl carry no keys, and they reveal no job data.
    """

    def __init__(self, keys: frozenset[str], *, protected: str) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self.prefix = f"/{protected}/"

    def _allowed(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value.removeprefix("Bearer ").strip().encode()
                # Compare against every key in constant time, so timing does not tell which prefix matched.
                return any([hmac.compare_digest(given, k) for k in self._keys])
        return False

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix) or self._allowed(details.invocation_metadata):
            return handler

        @contextlib.asynccontextmanager
        async def deny(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            code, message, trailers = to_status(
                Unauthenticated("authorization: send metadata 'authorization: Bearer <API key>' with a valid key")
            )
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises

        return _wrap(handler, deny)
