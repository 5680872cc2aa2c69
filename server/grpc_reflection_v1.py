"""gRPC server reflection under ``grpc.reflection.v1`` beside ``v1alpha``.

Current grpcurl and Postman ask ``grpc.reflection.v1.ServerReflection`` first; grpcio-reflection
(through 1.85) implements only ``v1alpha``. The two protocols are the same messages with the same
field numbers under another package name (v1 was v1alpha promoted), so the v1alpha servicer answers
v1 calls unchanged: this registers it under the v1 method path with the v1alpha (de)serializers,
which read and write the identical wire format.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (the reflection services themselves are added) under
    both v1alpha and v1."""
    names = (*service_names, reflection.SERVICE_NAME, SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })
    server.add_generic_rpc_handlers((handler,))
