"""How a worker pod carries its task: DNS-safe names, label-safe values, and the annotations that
map a pod back to its TaskKey.

Names are deterministic in (task key, launch attempt), which is what makes a retried launch
idempotent: a second create of the same pod answers 409 AlreadyExists instead of making a twin.
A key's resumption (the same try queued again after it handed control back) is part of it, and
only shows when it is not 0, so the first run of every try keeps the key string, name, labels and
annotations it had before resumptions existed.
Labels are for selecting (sanitised, so they may lose information); annotations keep the raw
values and are the source of truth when mapping a pod back to its task.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from shepherd.v1 import task_pb2

PREFIX = "shepherd.dev/"
LABEL_WORKER = PREFIX + "worker"  # "true" on every pod Shepherd makes
LABEL_EXECUTOR = PREFIX + "executor-id"
LABEL_DAG_ID = PREFIX + "dag-id"
LABEL_TASK_ID = PREFIX + "task-id"
LABEL_RUN_ID = PREFIX + "run-id"
LABEL_TRY_NUMBER = PREFIX + "try-number"
LABEL_MAP_INDEX = PREFIX + "map-index"
LABEL_RESUMPTION = PREFIX + "resumption"  # only on a resumed run (resumption > 0)
LABEL_DONE = PREFIX + "done"  # finished and handled; kept pods carry it so nothing touches them again
LABEL_REVOKED = PREFIX + "revoked"

ANNOTATION_DAG_ID = PREFIX + "dag-id"
ANNOTATION_TASK_ID = PREFIX + "task-id"
ANNOTATION_RUN_ID = PREFIX + "run-id"
ANNOTATION_TRY_NUMBER = PREFIX + "try-number"
ANNOTATION_MAP_INDEX = PREFIX + "map-index"
ANNOTATION_RESUMPTION = PREFIX + "resumption"  # absent means 0: pods made before resumptions existed
ANNOTATION_LAUNCH_ATTEMPT = PREFIX + "launch-attempt"
# The W3C trace context of the pod's launch, when it was traced (shepherd/tracing.py): the watcher
# hands it on in each PodEvent, so the whole task is one trace.
ANNOTATION_TRACEPARENT = PREFIX + "traceparent"
MAX_TRACEPARENT = 128  # a version-00 traceparent has 55 characters; later versions may add some

# The container that runs the task. Its exit decides the task's outcome, whatever other containers
# (sidecars: a mesh proxy, a log shipper) keep doing.
BASE_CONTAINER = "base"

MAX_NAME = 63
MAX_RESUMPTION = 1_000_000  # protos: TaskKey.resumption
MAX_LABEL = 63
_HASH_LEN = 10
_INVALID_NAME_CHARS = re.compile(r"[^a-z0-9]+")
_INVALID_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_LABEL_VALUE = re.compile(r"^(|[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def key_string(key: task_pb2.TaskKey) -> str:
    """A canonical, unambiguous string for a key (unit separator cannot occur in valid ids). A
    resumption is a sixth part, left out when 0: stores keyed by the five-part string before
    resumptions existed still find their tasks."""
    parts = [key.dag_id, key.task_id, key.run_id, str(key.try_number), str(key.map_index)]
    if key.resumption:
        parts.append(str(key.resumption))
    return "\x1f".join(parts)


def log_key(key: task_pb2.TaskKey | str) -> str:
    """The key as log lines show it, "dag/task/run/try/map[/resumption]", from a TaskKey or a
    key_string."""
    return (key if isinstance(key, str) else key_string(key)).replace("\x1f", "/")


def pod_name(key: task_pb2.TaskKey, attempt: int = 1) -> str:
    """DNS-1123 label, at most 63 characters, readable prefix plus a hash of the whole key and attempt."""
    readable = _INVALID_NAME_CHARS.sub("-", f"{key.dag_id}-{key.task_id}".lower()).strip("-")
    suffix = _digest(f"{key_string(key)}\x1f{attempt}")
    readable = readable[: MAX_NAME - _HASH_LEN - 1].rstrip("-")
    return f"{readable}-{suffix}" if readable else f"task-{suffix}"


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL.match(name))


def safe_label_value(value: str) -> str:
    """A valid label value. Unchanged when already valid; otherwise cleaned, cut, and suffixed with a
    hash of the original so two different inputs never collide on the same cleaned value."""
    if _LABEL_VALUE.match(value):
        return value
    cleaned = _INVALID_LABEL_CHARS.sub("-", value)
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    cleaned = cleaned[: MAX_LABEL - _HASH_LEN - 1]
    cleaned = re.sub(r"[^A-Za-z0-9]+$", "", cleaned)
    return f"{cleaned}-{_digest(value)}" if cleaned else _digest(value)


def task_labels(key: task_pb2.TaskKey, executor_id: str) -> dict[str, str]:
    labels = {
        LABEL_WORKER: "true",
        LABEL_EXECUTOR: safe_label_value(executor_id),
        LABEL_DAG_ID: safe_label_value(key.dag_id),
        LABEL_TASK_ID: safe_label_value(key.task_id),
        LABEL_RUN_ID: safe_label_value(key.run_id),
        LABEL_TRY_NUMBER: str(key.try_number),
        "app.kubernetes.io/managed-by": "shepherd",
    }
    if key.map_index >= 0:
        labels[LABEL_MAP_INDEX] = str(key.map_index)
    if key.resumption:
        labels[LABEL_RESUMPTION] = str(key.resumption)
    return labels


def task_annotations(key: task_pb2.TaskKey, attempt: int) -> dict[str, str]:
    annotations = {
        ANNOTATION_DAG_ID: key.dag_id,
        ANNOTATION_TASK_ID: key.task_id,
        ANNOTATION_RUN_ID: key.run_id,
        ANNOTATION_TRY_NUMBER: str(key.try_number),
        ANNOTATION_MAP_INDEX: str(key.map_index),
        ANNOTATION_LAUNCH_ATTEMPT: str(attempt),
    }
    if key.resumption:
        annotations[ANNOTATION_RESUMPTION] = str(key.resumption)
    return annotations


def key_from_annotations(annotations: Mapping[str, str]) -> task_pb2.TaskKey | None:
    """The task a pod belongs to, or None when the annotations are missing or malformed."""
    try:
        resumption = int(annotations.get(ANNOTATION_RESUMPTION, "0"))
        if not 0 <= resumption <= MAX_RESUMPTION:
            return None
        return task_pb2.TaskKey(
            dag_id=annotations[ANNOTATION_DAG_ID],
            task_id=annotations[ANNOTATION_TASK_ID],
            run_id=annotations[ANNOTATION_RUN_ID],
            try_number=int(annotations[ANNOTATION_TRY_NUMBER]),
            map_index=int(annotations.get(ANNOTATION_MAP_INDEX, "-1")),
            resumption=resumption,
        )
    except (KeyError, ValueError):
        return None


def executor_selector(executor_id: str) -> str:
    """Label selector for this executor's pods that still need attention."""
    return f"{LABEL_WORKER}=true,{LABEL_EXECUTOR}={safe_label_value(executor_id)},!{LABEL_DONE}"
