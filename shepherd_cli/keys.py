"""Task keys as one word on a command line: `dag/task/run[/try[/map_index[/resumption]]]`.

Operators copy keys between commands, logs and tickets, so a key is one token rather than five
flags. A part that itself contains `/` or `%` is percent-encoded (`%2F`, `%25`), which is also how
`format_key` writes it, so every key printed by the CLI can be pasted back into it.
"""

from __future__ import annotations

from urllib.parse import unquote

from shepherd.v1 import task_pb2

KEY_SYNTAX = "dag/task/run[/try[/map_index[/resumption]]]"


class KeySyntaxError(ValueError):
    """The text is not a task key; the message says which part is wrong."""


def parse_key(text: str) -> task_pb2.TaskKey:
    """`etl/extract/r1` is try 1 of an unmapped task; `etl/extract/r1/2/7` is try 2, map index 7;
    `etl/extract/r1/2/-1/3` is the third resumption of try 2 (the try queued again after it
    handed control back: a deferral resumed, a reschedule-mode sensor's poke)."""
    parts = text.split("/")
    if not 3 <= len(parts) <= 6:
        raise KeySyntaxError(f"{text!r} is not a task key: expected {KEY_SYNTAX}")
    names = [unquote(part) for part in parts[:3]]
    for label, value in zip(("dag", "task", "run"), names, strict=True):
        if not value:
            raise KeySyntaxError(f"{text!r}: the {label} part is empty")
    try_number = _integer(text, "try", parts[3]) if len(parts) > 3 else 1
    map_index = _integer(text, "map_index", parts[4]) if len(parts) > 4 else -1
    resumption = _integer(text, "resumption", parts[5]) if len(parts) > 5 else 0
    if resumption < 0:
        raise KeySyntaxError(f"{text!r}: the resumption part {parts[5]!r} must not be negative")
    return task_pb2.TaskKey(
        dag_id=names[0],
        task_id=names[1],
        run_id=names[2],
        try_number=try_number,
        map_index=map_index,
        resumption=resumption,
    )


def _integer(text: str, label: str, part: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise KeySyntaxError(f"{text!r}: the {label} part {part!r} is not an integer") from None


def format_key(key: task_pb2.TaskKey) -> str:
    """The inverse of `parse_key`; the map index is left out when the task is not mapped and not
    resumed, the resumption when it is 0."""
    names = [_escape(value) for value in (key.dag_id, key.task_id, key.run_id)]
    text = "/".join([*names, str(key.try_number)])
    if key.resumption:
        return f"{text}/{key.map_index}/{key.resumption}"
    return text if key.map_index == -1 else f"{text}/{key.map_index}"


def _escape(value: str) -> str:
    # Only what would break the split; run ids keep their `:` and `+` readable.
    return value.replace("%", "%25").replace("/", "%2F")
