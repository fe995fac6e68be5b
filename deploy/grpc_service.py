"""specd.v1.Specd's registration on Serve's gRPC proxy, with request parsing that cannot fail.

The generated ``add_SpecdServicer_to_server`` parses requests with ``FromString`` inside grpc, before any
code of ours runs, so bytes that are not a valid message got grpc's UNKNOWN with a Python exception
name. Here the parse hands such bytes on as :class:`Undecodable`, and the ingress answers it with
INVALID_ARGUMENT and a message, like any other bad request. Everything else is the generated code's.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from specd_api.v1 import specd_pb2 as pb


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse (crosses from the proxy to the ingress replica, pickled)."""

    error: str


def _lenient(message):
    def parse(data: bytes):
        try:
            return message.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
            return Undecodable(f"request is not a valid {message.DESCRIPTOR.full_name} message ({e})")
    return parse


def add_SpecdServicer_to_server(servicer, server) -> None:  # noqa: N802 - the name Serve's config expects
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_lenient(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("specd.v1.Specd", handlers),))
    server.add_registered_method_handlers("specd.v1.Specd", handlers)
