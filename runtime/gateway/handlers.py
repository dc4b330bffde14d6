"""The `blockpress.v1.Runtime` method handlers: API keys, one span per call, tolerant request parsing.

Each method's handler does, in this order, what three layers used to: it refuses a call without a
valid API key (UNAUTHENTICATED, before anything else runs or is recorded), opens the call's
`gateway.<Method>` span parented on the caller's W3C headers, and answers bytes that do not parse
with INVALID_ARGUMENT. These are plain wrappers built once per method at start-up rather than
grpc.aio server interceptors, which run a coroutine and build a new handler object per call: on a
submit burst that was a tenth of the gateway's CPU. Health checking and reflection are registered
separately and stay open (probes and grpcurl carry no keys; they reveal no job data).

The generated `add_RuntimeServicer_to_server` would hand each request's bytes to `FromString` before
the servicer runs; bytes that do not parse (invalid UTF-8 in a string field, a corrupt wire format)
then end the call as UNKNOWN, a code no client can act on. Here parsing returns a `Malformed` marker
instead, and the method answers INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import trace

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import InvalidArgument, Unauthenticated, to_status
from blockpress.runtime.tracing.names import Attr, SpanName
from blockpress.runtime.tracing.telemetry import extract_context, get_tracer

__all__ = ["Malformed", "Traced", "add_runtime_to_server", "record_status"]

_SERVICE = pb.DESCRIPTOR.services_by_name["Runtime"]
_NO_KEY = Unauthenticated("authorization: send metadata 'authorization: Bearer <API key>' with a valid key")


def record_status(code: grpc.StatusCode) -> None:
    """Puts the call's status code on the gateway span (an abort ends the call by raising)."""
    trace.get_current_span().set_attribute(Attr.RPC_GRPC_STATUS_CODE, code.value[0])


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request whose bytes did not parse as `type_name`; `reason` is protobuf's own words."""

    type_name: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            "request",
            f"is not a valid {self.type_name} message ({self.reason}); string fields must be UTF-8",
        )


def _parser(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            # protobuf's message names the type and what broke, never the request's content.
            return Malformed(name, str(exc).removeprefix(f"Error parsing message with type '{name}': ") or "bad bytes")

    return parse


class _Guard:
    """What every Runtime call passes before its method runs: the key check and the call's span."""

    def __init__(self, method: str, tracer: trace.Tracer, keys: Collection[str]) -> None:
        self.name = SpanName.gateway(method)
        self.tracer = tracer
        self.keys = tuple(k.encode() for k in keys)
        self.attributes = {
            Attr.RPC_SYSTEM: "grpc",
            Attr.RPC_SERVICE: _SERVICE.full_name,
            Attr.RPC_METHOD: method,
            Attr.RPC_GRPC_STATUS_CODE: 0,
        }

    async def admit(self, context: grpc.aio.ServicerContext) -> tuple[trace.Span, otel_context.Context]:
        """The call's span and its context; aborts UNAUTHENTICATED first when a key is required and wrong."""
        return self.open(await self.authorize(context))

    async def authorize(self, context: grpc.aio.ServicerContext) -> otel_context.Context:
        """The caller's trace context, once the key check passed (else the call ends UNAUTHENTICATED)."""
        metadata = context.invocation_metadata() or ()
        if self.keys and not self._allowed(metadata):
            code, message, trailers = to_status(_NO_KEY)
            context.set_trailing_metadata(trailers)
            await context.abort(code, message)
        # Only text headers can carry trace context; the authorization header is never copied anywhere.
        return extract_context({k: v for k, v in metadata if isinstance(v, str) and k != "authorization"})

    def open(self, parent: otel_context.Context) -> tuple[trace.Span, otel_context.Context]:
        """A new span of this method under `parent`, and the context with it current."""
        span = self.tracer.start_span(self.name, parent, trace.SpanKind.SERVER, self.attributes)
        return span, trace.set_span_in_context(span, parent)

    def _allowed(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value.removeprefix("Bearer ").strip().encode()
                # Compare against every key in constant time, so timing does not tell which prefix matched.
                return any([hmac.compare_digest(given, k) for k in self.keys])
        return False


async def _refuse(bad: Malformed, context: grpc.aio.ServicerContext) -> None:
    code, message, trailers = to_status(bad.error())
    record_status(code)
    await context.abort(code, message, trailing_metadata=trailers)


def _unary(guard: _Guard, method: Callable[[Any, grpc.aio.ServicerContext], Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        span, ctx = await guard.admit(context)
        token = otel_context.attach(ctx)
        try:
            if isinstance(request, Malformed):
                await _refuse(request, context)
            return await method(request, context)
        finally:
            otel_context.detach(token)
            span.end()

    return call


def _stream(
    guard: _Guard, method: Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any]]
) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        span, ctx = await guard.admit(context)
        try:
            token = otel_context.attach(ctx)
            try:
                if isinstance(request, Malformed):
                    await _refuse(request, context)
            finally:
                otel_context.detach(token)
            items = method(request, context)
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
            finally:
                await items.aclose()
        except asyncio.CancelledError:  # the client went away
            span.set_attribute(Attr.RPC_GRPC_STATUS_CODE, grpc.StatusCode.CANCELLED.value[0])
            raise
        finally:
            span.end()

    return call


Traced = Callable[[Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]], Callable[[Any], Awaitable[Any]]]
"""What a method answering many requests in one call runs each of them under (see `_per_request`)."""

_PER_REQUEST = frozenset({"SubmitMany"})
"""Methods whose message carries many requests, each traced as a call of its own."""


def _per_request(guard: _Guard, method: Callable[[Any, grpc.aio.ServicerContext, Traced], Awaitable[Any]]) -> Any:
    """A call carrying many requests (SubmitMany): the key is checked once, and every request gets the
    span a unary call of it would have had, parented on the caller's headers. Not one span for the
    call: each job's trace then starts at its own request, as with Submit, instead of a batch's jobs
    sharing one trace."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        parent = await guard.authorize(context)
        if isinstance(request, Malformed):
            span, _ = guard.open(parent)
            # As a unary call's span: the status code on it, not the abort as an exception.
            with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
                await _refuse(request, context)

        def traced(one: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
            async def run(item: Any) -> Any:
                span, ctx = guard.open(parent)
                token = otel_context.attach(ctx)  # each item runs in a task of its own, with its own context
                try:
                    return await one(item, context)
                finally:
                    otel_context.detach(token)
                    span.end()

            return run

        return await method(request, context, traced)

    return call


def add_runtime_to_server(
    servicer: Any,
    server: grpc.aio.Server,
    *,
    tracer: trace.Tracer | None = None,
    api_keys: Collection[str] = (),
) -> None:
    """Registers `servicer`'s Runtime methods on `server`, each behind the key check and its span.

    Takes the place of the generated `add_RuntimeServicer_to_server`; the methods, their names and
    the wire format are the same. `tracer` defaults to the global BlockPress tracer (a proxy, so a
    `setup_tracing` after this call still takes effect); no `api_keys` leaves the service open.
    """
    tracer = tracer or get_tracer()
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in _SERVICE.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        guard = _Guard(method.name, tracer, api_keys)
        behaviour = getattr(servicer, method.name)
        parse, write = _parser(request_cls), response_cls.SerializeToString
        if method.name in _PER_REQUEST:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _per_request(guard, behaviour), request_deserializer=parse, response_serializer=write
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(guard, behaviour), request_deserializer=parse, response_serializer=write
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(guard, behaviour), request_deserializer=parse, response_serializer=write
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)
