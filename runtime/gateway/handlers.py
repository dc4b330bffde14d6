"""The `blockpress.v1.Runtime` method handlers, with request parsing that never fails inside gRPC.

The generated `add_RuntimeServicer_to_server` hands each request's bytes to `FromString` before the
servicer runs; bytes that do not parse (invalid UTF-8 in a string field, a corrupt wire format) then
end the call as UNKNOWN, a code no client can act on. Here parsing returns a `Malformed` marker
instead, and the method answers INVALID_ARGUMENT naming the message type, so every byte string a
client can send gets a status that says it was the client's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from blockpress.runtime._pb import runtime_pb2 as pb
from blockpress.runtime.contracts.errors import InvalidArgument, to_status
from blockpress.runtime.gateway.interceptors import record_status

__all__ = ["Malformed", "add_runtime_to_server"]

_SERVICE = pb.DESCRIPTOR.services_by_name["Runtime"]


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


async def _refuse(bad: Malformed, context: grpc.aio.ServicerContext) -> None:
    code, message, trailers = to_status(bad.error())
    record_status(code)
    await context.abort(code, message, trailing_metadata=trailers)


def _unary(method: Callable[[Any, grpc.aio.ServicerContext], Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await _refuse(request, context)
        return await method(request, context)

    return call


def _stream(method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await _refuse(request, context)
        async for item in method(request, context):
            yield item

    return call


def add_runtime_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers `servicer`'s Runtime methods on `server` with the tolerant request parser.

    Takes the place of the generated `add_RuntimeServicer_to_server`; the methods, their names and
    the wire format are the same.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in _SERVICE.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        wrap = _stream if method.server_streaming else _unary
        parse, write = _parser(request_cls), response_cls.SerializeToString
        handlers[method.name] = make(wrap(behaviour), request_deserializer=parse, response_serializer=write)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)
