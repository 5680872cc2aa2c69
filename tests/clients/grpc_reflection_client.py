"""A reflection-driven gRPC client, as grpcurl and Postman are: the services listed over
``grpc.reflection.v1`` (what they ask first) and ``v1alpha`` (grpcio-reflection's own client), the
Embed method's messages built from the reflected descriptors, and an Embed call made with them."""

import json
import struct
import sys

import grpc
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

job = json.loads(sys.argv[1])
SERVICE = "infercore.v1.InferenceService"
channel = grpc.insecure_channel(job["grpc_target"])
auth = (("authorization", f"Bearer {job['api_key']}"),)

# v1: the same messages as v1alpha under another package, so v1alpha's classes write v1's bytes.
info = channel.stream_stream(
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
)
listed, described = info(iter([
    reflection_pb2.ServerReflectionRequest(list_services=""),
    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
]), timeout=60)
v1_files = [descriptor_pb2.FileDescriptorProto.FromString(f)
            for f in described.file_descriptor_response.file_descriptor_proto]

database = ProtoReflectionDescriptorDatabase(channel)
service = DescriptorPool(database).FindServiceByName(SERVICE)
method = service.methods_by_name["Embed"]
request_class = message_factory.GetMessageClass(method.input_type)
response_class = message_factory.GetMessageClass(method.output_type)
embed = channel.unary_unary(f"/{SERVICE}/Embed", request_serializer=request_class.SerializeToString,
                            response_deserializer=response_class.FromString)
response = embed(request_class(inputs=job["texts"], model="minilm"), metadata=auth, timeout=60)
matrix = response.embeddings
floats = struct.unpack(f"<{matrix.count * matrix.dimensions}f", matrix.data)
vectors = [list(floats[i * matrix.dimensions:(i + 1) * matrix.dimensions]) for i in range(matrix.count)]

try:
    embed(request_class(inputs=["x"], model="no-such-model"), metadata=auth, timeout=60)
    unknown_model = None
except grpc.RpcError as exc:
    unknown_model = {"class": f"{type(exc).__module__}.{type(exc).__qualname__}", "status": exc.code().name,
                     "message": exc.details()}

print(json.dumps({
    "v1_services": sorted(s.name for s in listed.list_services_response.service),
    "v1_service_files": sorted(s.name for f in v1_files for s in f.service),
    "v1alpha_services": sorted(database.get_services()),
    "methods": sorted(service.methods_by_name),
    "embed": vectors,
    "errors": {"unknown_model": unknown_model},
}))
