"""Bounded decoding of gRPC request messages: the gRPC equivalent of server/json_limits.py.

grpcio answers a request whose bytes its deserializer cannot parse with ``INTERNAL`` (and logs a
traceback), which is the server blaming itself for the client's bytes. ``BoundedRequests``, a server
interceptor on the inference services (``infercore.v1.InferenceService`` and the Open Inference
Protocol's ``inference.GRPCInferenceService``), wraps each method's deserializer instead:

- bytes that do not parse as the method's request (a length past the end, invalid UTF-8 in a string
  field, groups nested past the protobuf decoder's depth limit of 100) → ``INVALID_ARGUMENT``
  "request message cannot be decoded";
- a message holding more than ``max_elements`` values (set fields, repeated elements, nested
  messages; the same bound as ``--json-max-elements`` for HTTP bodies) → ``INVALID_ARGUMENT``
  naming the limit, before any handler turns the repeated fields into Python lists.

Nesting needs no bound of its own here: the protobuf decoder refuses more than 100 levels, and the
service's messages nest at most two levels. The message size is bounded by gRPC's receive limit
(``--payload-limit``). In a stream, the requests before a refused message are answered, then the
call ends with that status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message


class RefusedMessage:
    """What the wrapped deserializer returns instead of a message it refuses."""

    def __init__(self, reason: str):
        self.reason = reason


def count_values(message: Message, limit: int) -> int:
    """Values in ``message``: each set singular field, each element of a repeated field, and the
    values inside nested messages. Stops counting once past ``limit``."""
    total = 0
    for field, value in message.ListFields():
        if field.is_repeated:
            total += len(value)
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            if field.type == FieldDescriptor.TYPE_MESSAGE and not is_map:
                for item in value:
                    if total > limit:
                        return total
                    total += count_values(item, limit - total)
        else:
            total += 1
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                total += count_values(value, limit - total)
        if total > limit:
            return total
    return total


class BoundedRequests(grpc.aio.ServerInterceptor):
    """Refuses undecodable and oversized request messages of ``services`` (full service names) with
    ``INVALID_ARGUMENT``; other services (health, reflection) are left as they are."""

    def __init__(self, max_elements: int, services: tuple[str, ...]):
        self.max_elements = max_elements
        self.prefixes = tuple(f"/{service}/" for service in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (handler is None or handler.request_deserializer is None
                or not handler_call_details.method.startswith(self.prefixes)):
            return handler
        deserialize = self._bounded(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=deserialize, unary_unary=_checked_unary(handler.unary_unary))
        if handler.stream_stream is not None:
            return handler._replace(request_deserializer=deserialize,
                                    stream_stream=_checked_stream(handler.stream_stream))
        return handler  # the service has no other kinds of method

    def _bounded(self, deserialize: Callable[[bytes], Message]) -> Callable[[bytes], Any]:
        limit = self.max_elements

        def bounded(data: bytes) -> Message | RefusedMessage:
            try:
                message = deserialize(data)
            except DecodeError:
                return RefusedMessage("request message cannot be decoded: it is not a valid protobuf encoding "
                                      "of the method's request (or a string field is not valid UTF-8)")
            values = count_values(message, limit)
            if values > limit:
                return RefusedMessage(f"request message holds more than {limit} values, the limit "
                                      "(--json-max-elements, which bounds gRPC messages too)")
            return message

        return bounded


def _checked_unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, RefusedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behaviour(request, context)

    return checked


def _checked_stream(behaviour: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        refused: list[RefusedMessage] = []

        async def accepted() -> AsyncIterator[Any]:
            # A refused message ends the stream's input here; the call is aborted below, from the
            # handler's own task (aborting from the task that reads requests wedges the call).
            async for request in requests:
                if isinstance(request, RefusedMessage):
                    refused.append(request)
                    return
                yield request

        async for response in behaviour(accepted(), context):
            yield response
        if refused:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0].reason)

    return checked
