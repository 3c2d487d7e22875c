"""`shepherd tasks launch -f task.yaml`: a task described in YAML, turned into LaunchTaskRequests.

One task per YAML document (`---` separates several):

    key: etl/extract/r1          # or a mapping: {dag_id, task_id, run_id, try_number, map_index,
                                 #                resumption}
    command: [python, -m, etl.extract]
    template_name: ""            # optional; or template: {a whole v1 Pod}
    pod_override:                # optional partial v1 Pod, merged over the generated one
      metadata: {annotations: {team: data}}

Validation of the values themselves is the launcher's (it names the field); this module only
checks the shape, so a typo in a field name is caught here instead of silently ignored.
"""

from __future__ import annotations

from typing import Any

import yaml

from shepherd.v1 import launcher_service_pb2, task_pb2
from shepherd_cli.keys import KEY_SYNTAX, KeySyntaxError, parse_key

_FIELDS = {"key", "command", "template_name", "template", "pod_override"}
_KEY_FIELDS = set(task_pb2.TaskKey.DESCRIPTOR.fields_by_name)


class TaskFileError(ValueError):
    """The file is not a task description; the message names the document and field."""


def parse_task_file(text: str) -> list[launcher_service_pb2.LaunchTaskRequest]:
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        raise TaskFileError(f"not valid YAML: {err}") from None
    if not docs:
        raise TaskFileError("the file describes no task")
    return [_request(doc, f"document {i + 1}") for i, doc in enumerate(docs)]


def _request(doc: Any, where: str) -> launcher_service_pb2.LaunchTaskRequest:
    if not isinstance(doc, dict):
        raise TaskFileError(f"{where}: expected a mapping with key and command")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise TaskFileError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    command = doc.get("command")
    if not isinstance(command, list) or not all(isinstance(arg, str | int | float) for arg in command):
        raise TaskFileError(f"{where}: command must be a list of strings")
    request = launcher_service_pb2.LaunchTaskRequest(
        key=_key(doc.get("key"), where), command=[str(arg) for arg in command]
    )
    if "template_name" in doc:
        request.template_name = str(doc["template_name"])
    for field, target in (("template", "template_yaml"), ("pod_override", "pod_override_yaml")):
        if field in doc:
            value = doc[field]
            if not isinstance(value, dict | str):
                raise TaskFileError(f"{where}: {field} must be a mapping (a v1 Pod) or YAML text")
            setattr(request, target, value if isinstance(value, str) else yaml.safe_dump(value))
    return request


def _key(value: Any, where: str) -> task_pb2.TaskKey:
    if isinstance(value, str):
        try:
            return parse_key(value)
        except KeySyntaxError as err:
            raise TaskFileError(f"{where}: key: {err}") from None
    if isinstance(value, dict):
        unknown = sorted(set(value) - _KEY_FIELDS)
        if unknown:
            raise TaskFileError(f"{where}: key has unknown field {unknown[0]!r}")
        fields = {"try_number": 1, "map_index": -1, **value}
        try:
            return task_pb2.TaskKey(**fields)
        except (TypeError, ValueError) as err:
            raise TaskFileError(f"{where}: key: {err}") from None
    raise TaskFileError(f"{where}: key is required, as {KEY_SYNTAX} or a mapping")
