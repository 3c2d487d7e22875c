"""Every enum field reachable from a message type, and requests that put an undefined number in
one of them: the generic bad-enum cases, so a new enum field is covered without a new test."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from shepherd.v1 import launcher_service_pb2, reconciler_service_pb2, watcher_service_pb2

SERVICE_FILES = (launcher_service_pb2, reconciler_service_pb2, watcher_service_pb2)


def enum_paths(descriptor: Descriptor, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, ...]]:
    """Field-name paths from `descriptor` to each enum field; a repeated field on the way is
    entered through its first element. Recursive message types are followed a few levels deep."""
    if depth > 4:
        return
    for field in descriptor.fields:
        if field.enum_type is not None:
            yield (field.name,)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for rest in enum_paths(field.message_type, depth=depth + 1):
                yield (field.name, *rest)


def path_name(message_type: Descriptor, path: tuple[str, ...]) -> str:
    """The path as the services name fields: `a.b`, with `[0]` after a repeated field."""
    parts, descriptor = [], message_type
    for name in path:
        field = descriptor.fields_by_name[name]
        parts.append(f"{name}[0]" if field.is_repeated else name)
        if field.message_type is not None:
            descriptor = field.message_type
    return ".".join(parts)


def with_enum(message_type: Descriptor, path: tuple[str, ...], number: int) -> Message:
    """A message of `message_type` whose enum at `path` holds `number` (defined or not)."""
    message = GetMessageClass(message_type)()
    node: Message = message
    for name in path[:-1]:
        field = node.DESCRIPTOR.fields_by_name[name]
        node = getattr(node, name).add() if field.is_repeated else getattr(node, name)
    last = node.DESCRIPTOR.fields_by_name[path[-1]]
    if last.is_repeated:
        getattr(node, path[-1]).append(number)
    else:
        setattr(node, path[-1], number)
    return message


def every_rpc_enum_case() -> Iterator[tuple[str, str, str, Descriptor, tuple[str, ...]]]:
    """(service full name, method, streaming kind, request type, enum path) for every enum field of
    every request of the three services."""
    for module in SERVICE_FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                kind = "unary_stream" if method.server_streaming else "unary_unary"
                for path in enum_paths(method.input_type):
                    yield service.full_name, method.name, kind, method.input_type, path
