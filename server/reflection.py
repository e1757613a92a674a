"""gRPC server reflection under both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

Current generic clients (grpcurl, Postman, grpcui, Evans) ask for ``grpc.reflection.v1`` first; older
ones only know ``v1alpha``. The two protocols are the same messages under another package name, so
one servicer answers both: grpcio-reflection's own ``v1`` module where the installed version has one,
else its ``v1alpha`` servicer registered a second time under the ``v1`` service name (same wire format).
So that ``describe grpc.reflection.v1.ServerReflection`` works too, the ``v1`` file descriptor is added
to the descriptor pool when the installed package does not bring it (``v1alpha``'s, renamed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME
METHOD = "ServerReflectionInfo"
METHODS = (f"{V1_SERVICE_NAME}/{METHOD}", f"{V1ALPHA_SERVICE_NAME}/{METHOD}")


def _v1_module() -> Any:
    """grpcio-reflection's own ``grpc_reflection.v1.reflection`` (newer releases), else None."""
    try:
        from grpc_reflection.v1 import reflection  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return reflection if hasattr(reflection, "enable_server_reflection") else None


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """The ``grpc.reflection.v1`` file, made from ``v1alpha``'s (same messages), into ``pool``."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(fdp)
    old = v1alpha_pb2.DESCRIPTOR.package
    fdp.name, fdp.package = V1_FILE, V1_PACKAGE
    fdp.options.Clear()

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for msg in messages:
            for f in msg.field:
                if f.type_name.startswith(f".{old}."):
                    f.type_name = f".{V1_PACKAGE}." + f.type_name[len(old) + 2:]
            rename(msg.nested_type)

    rename(fdp.message_type)
    for service in fdp.service:
        for m in service.method:
            m.input_type = m.input_type.replace(f".{old}.", f".{V1_PACKAGE}.")
            m.output_type = m.output_type.replace(f".{old}.", f".{V1_PACKAGE}.")
    pool.Add(fdp)


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> tuple[str, ...]:
    """Reflection for ``service_names`` (and both reflection services) on ``server``; returns the
    service names it lists."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    v1 = _v1_module()
    v1alpha.enable_server_reflection(names, server)
    if v1 is not None:
        v1.enable_server_reflection(names, server)
        return names
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = v1alpha.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString)
    generic = grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {METHOD: handler})
    server.add_generic_rpc_handlers((generic,))
    return names
