"""Request validation that names the offending field, so every bad request is answered with a
precise INVALID_ARGUMENT before it can touch any state."""

from __future__ import annotations

import re
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from shepherd import podmeta
from shepherd.v1 import task_pb2

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_ID_LEN = 250
MAX_TRY_NUMBER = 100_000
MAX_RESUMPTION = podmeta.MAX_RESUMPTION


class InvalidField(ValueError):
    """A request field is invalid. `field` is its path, e.g. "requests[2].key.dag_id"."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def check_text(value: str, field: str, *, max_len: int, required: bool = True) -> None:
    if required and not value:
        raise InvalidField(field, "must not be empty")
    if len(value) > max_len:
        raise InvalidField(field, f"must be at most {max_len} characters (got {len(value)})")
    if _CONTROL_CHARS.search(value):
        raise InvalidField(field, "must not contain control characters")


def check_key(key: task_pb2.TaskKey, field: str = "key", *, present: bool = True) -> None:
    if not present:
        raise InvalidField(field, "is required")
    check_text(key.dag_id, f"{field}.dag_id", max_len=MAX_ID_LEN)
    check_text(key.task_id, f"{field}.task_id", max_len=MAX_ID_LEN)
    check_text(key.run_id, f"{field}.run_id", max_len=MAX_ID_LEN)
    if not 1 <= key.try_number <= MAX_TRY_NUMBER:
        raise InvalidField(
            f"{field}.try_number", f"must be between 1 and {MAX_TRY_NUMBER} (got {key.try_number})"
        )
    if key.map_index < -1:
        raise InvalidField(f"{field}.map_index", f"must be -1 (not mapped) or >= 0 (got {key.map_index})")
    if key.resumption > MAX_RESUMPTION:
        raise InvalidField(f"{field}.resumption", f"must be at most {MAX_RESUMPTION} (got {key.resumption})")


def check_enums(message: Message, prefix: str = "") -> None:
    """Every enum field set in `message`, nested and repeated ones included, holds a number its enum
    defines. Proto3 enums are open: an undefined number parses fine and would otherwise be taken at
    face value (as a filter matching nothing, say). The servers run this on every request."""
    if not _has_enums(message.DESCRIPTOR):
        return
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.enum_type is not None:
            for i, number in enumerate(value) if field.is_repeated else [(None, value)]:
                if number not in field.enum_type.values_by_number:
                    path = name if i is None else f"{name}[{i}]"
                    raise InvalidField(path, f"{number} is not a value of {field.enum_type.full_name}")
        elif field.message_type is not None and _has_enums(field.message_type):
            if field.message_type.GetOptions().map_entry:
                _check_map(field, value, name)
            elif field.is_repeated:
                for i, item in enumerate(value):
                    check_enums(item, f"{name}[{i}].")
            else:
                check_enums(value, f"{name}.")


def _check_map(field: FieldDescriptor, entries: object, name: str) -> None:
    entry = field.message_type
    assert entry is not None  # a map field's entry type
    value_field = entry.fields_by_name["value"]
    for key, value in entries.items():  # type: ignore[attr-defined]  # a protobuf map container
        path = f"{name}[{key}]"
        if value_field.enum_type is not None and value not in value_field.enum_type.values_by_number:
            raise InvalidField(path, f"{value} is not a value of {value_field.enum_type.full_name}")
        if value_field.message_type is not None:
            check_enums(value, f"{path}.")


@cache
def _has_enums(descriptor: Descriptor, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether any enum field is reachable from `descriptor` (most requests have none: skip them)."""
    seen = _seen | {descriptor.full_name}
    for field in descriptor.fields:
        if field.enum_type is not None:
            return True
        nested = field.message_type
        if nested is not None and nested.full_name not in seen and _has_enums(nested, seen):
            return True
    return False
