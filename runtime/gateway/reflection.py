"""gRPC server reflection under both service names, `grpc.reflection.v1` and `v1alpha`.

grpcurl and current clients ask `grpc.reflection.v1.ServerReflection` first; grpcio-reflection (1.85)
ships only `v1alpha`. The two protocols are the same messages under another package name, identical
on the wire, so the v1alpha servicer answers v1 calls as well, through a generic handler.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["V1_SERVICE_NAME", "enable_reflection"]

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection of `service_names` (plus the v1alpha reflection service) on `server`.

    The v1 name is served but not listed: its descriptor is not in the process's descriptor pool, so a
    client that listed it and then asked to describe it would get an error.

    Args:
        service_names: fully qualified names of the services to list.
        server: the not yet started grpc.aio server.
    """
    names = (*service_names, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
