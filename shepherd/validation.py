"""Request validation that names the offending field, so every bad request is answered with a
precise INVALID_ARGUMENT before it can touch any state."""

from __future__ import annotations

import re

from shepherd.v1 import task_pb2

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_ID_LEN = 250
MAX_TRY_NUMBER = 100_000


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
