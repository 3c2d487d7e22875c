"""Building a worker pod from a template, the task, and a per-task override.

Layers merge left to right: template -> generated pod -> override. Scalars: the later layer wins.
Mappings (labels, annotations, nodeSelector, resources...): merged key by key. env, envFrom,
volumes, volumeMounts and initContainers: concatenated, a later entry replacing an earlier one with
the same name (mountPath for mounts), so no pod ends up with duplicate entries. Containers are
matched by name; the task runs in the container named `base`. Any other list: the later one wins.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

from services.launcher import podschema, yamldoc
from shepherd import podmeta
from shepherd.v1 import task_pb2
from shepherd.validation import InvalidField

MAX_DOC_BYTES = 256 * 1024
MAIN_CONTAINER = podmeta.BASE_CONTAINER
_CONCAT_BY: dict[str, str] = {
    "env": "name",
    "envFrom": "",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "initContainers": "name",
}
_RESERVED_PREFIX = podmeta.PREFIX
_CONTAINER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _clone(value: Any) -> Any:
    """A deep copy of JSON-shaped data, several times faster than copy.deepcopy."""
    return orjson.loads(orjson.dumps(value))


@functools.lru_cache(maxsize=64)
def parse_pod_document(text: str, field: str) -> dict[str, Any]:
    """A YAML or JSON v1 Pod (whole or partial) as a dict; INVALID_ARGUMENT naming the field otherwise.

    Read with limits (yamldoc) and checked against the Pod schema (podschema), so an unknown or
    misspelt field, or a value of the wrong type, is refused by its path. Schedulers send the same
    few overrides over and over, so parsed documents are cached by their text: the result is shared
    and must not be modified (build_pod copies what it merges)."""
    doc = yamldoc.load(text, field, max_bytes=MAX_DOC_BYTES)
    if not isinstance(doc, dict):
        raise InvalidField(field, "must be a mapping (a v1 Pod), not " + podschema.describe(doc))
    for name, only in (("kind", "Pod"), ("apiVersion", "v1")):
        if doc.get(name) not in (None, only):  # null: unset
            raise InvalidField(f"{field}.{name}", f"must be {only} (got {str(doc[name])[:40]!r})")
    podschema.check_pod(doc, field)
    return doc


def check_override(override: dict[str, Any], field: str) -> None:
    """An override may not rename the pod or forge the metadata that maps it to its task."""
    meta = override.get("metadata") or {}
    if "name" in meta or "generateName" in meta:
        raise InvalidField(f"{field}.metadata.name", "cannot be set: pod names are derived from the task key")
    for section in ("labels", "annotations"):
        for name in meta.get(section) or {}:
            if str(name).startswith(_RESERVED_PREFIX):
                raise InvalidField(
                    f"{field}.metadata.{section}", f"{name!r}: the {_RESERVED_PREFIX} prefix is reserved"
                )


def _merge_named(base: list[Any], over: list[Any], key: str) -> list[Any]:
    if not key:
        return [*base, *over]
    result = list(base)
    index = {item.get(key): i for i, item in enumerate(result) if isinstance(item, dict)}
    for item in over:
        name = item.get(key) if isinstance(item, dict) else None
        if name is not None and name in index:
            result[index[name]] = item
        else:
            index[name] = len(result)
            result.append(item)
    return result


def _merge_containers(base: list[dict[str, Any]], over: list[dict[str, Any]]) -> list[dict[str, Any]]:
    result = list(base)
    by_name = {c.get("name"): i for i, c in enumerate(result)}
    for container in over:
        i = by_name.get(container.get("name"))
        if i is None:
            by_name[container.get("name")] = len(result)
            result.append(container)
        else:
            result[i] = _merge(result[i], container)
    return result


def _merge(result: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge `over` onto `result`, in place, by the rules in this module's docstring. Both must be
    private copies (build_pod makes them), so their parts can be shared freely."""
    for name, value in over.items():
        current = result.get(name)
        if value is None:
            continue
        if name == "containers" and isinstance(current, list) and isinstance(value, list):
            result[name] = _merge_containers(current, value)
        elif name in _CONCAT_BY and isinstance(current, list) and isinstance(value, list):
            result[name] = _merge_named(current, value, _CONCAT_BY[name])
        elif isinstance(current, dict) and isinstance(value, dict):
            result[name] = _merge(current, value)
        else:
            result[name] = value
    return result


def generated_pod(
    key: task_pb2.TaskKey, command: list[str], *, executor_id: str, namespace: str, attempt: int
) -> dict[str, Any]:
    """The layer Shepherd itself contributes: identity, task metadata and the command."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": podmeta.pod_name(key, attempt),
            "namespace": namespace,
            "labels": podmeta.task_labels(key, executor_id),
            "annotations": podmeta.task_annotations(key, attempt),
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": MAIN_CONTAINER,
                    "args": list(command),
                    "env": [{"name": "SHEPHERD_TASK_POD", "value": "true"}],
                }
            ],
        },
    }


def build_pod(
    template: dict[str, Any],
    key: task_pb2.TaskKey,
    command: list[str],
    *,
    override: dict[str, Any] | None,
    executor_id: str,
    namespace: str,
    attempt: int = 1,
) -> dict[str, Any]:
    """The complete pod for one launch attempt; INVALID_ARGUMENT when the result is not runnable."""
    pod = merge_pod(
        template,
        key,
        command,
        override=override,
        executor_id=executor_id,
        namespace=namespace,
        attempt=attempt,
    )
    check_runnable(pod)
    return pod


def merge_pod(
    template: dict[str, Any],
    key: task_pb2.TaskKey,
    command: list[str],
    *,
    override: dict[str, Any] | None,
    executor_id: str,
    namespace: str,
    attempt: int = 1,
) -> dict[str, Any]:
    """The three layers merged, with the pod's identity re-asserted, before any check."""
    generated = generated_pod(key, command, executor_id=executor_id, namespace=namespace, attempt=attempt)
    identity = generated["metadata"]
    name, labels, annotations = identity["name"], dict(identity["labels"]), dict(identity["annotations"])
    # The generated layer is fresh, so only the shared template and override need copying.
    pod = _merge(_clone(template), generated)
    if override:
        pod = _merge(pod, _clone(override))
    # Identity is re-asserted last: neither template nor override can change what maps pod to task.
    pod["metadata"]["name"] = name
    pod["metadata"]["labels"].update(labels)
    pod["metadata"]["annotations"].update(annotations)
    return pod


def check_runnable(pod: dict[str, Any]) -> None:
    """INVALID_ARGUMENT when the merged pod could not run whatever the policy says: a bad namespace
    name, a container without a valid name or an image. (Which namespaces are allowed is policy.)"""
    namespace = pod["metadata"].get("namespace", "")
    if not podmeta.is_dns_label(str(namespace)):
        raise InvalidField(
            "pod_override_yaml.metadata.namespace", f"{str(namespace)[:64]!r} is not a valid namespace name"
        )
    containers = pod["spec"].get("containers") or []
    for i, container in enumerate([*(pod["spec"].get("initContainers") or []), *containers]):
        if not isinstance(container, dict):
            raise InvalidField(f"pod.spec.containers[{i}]", "must be a mapping")
        name = str(container.get("name", ""))
        if not _CONTAINER_NAME.match(name):
            raise InvalidField(f"pod.spec.containers[{i}].name", f"{name!r} is not a valid container name")
        if not container.get("image"):
            raise InvalidField(
                f"pod.spec.containers[{name}].image",
                "no image: set it in the pod template or the pod override",
            )
