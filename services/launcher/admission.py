"""Admission: from a launch request to the pod the launcher may create, or a precise refusal.

Each step refuses what it can name: the command, the documents (read with limits and checked
against the Pod schema), the merged pod (runnable at all), and finally the pod policy on the final
pod. A malformed request is INVALID_ARGUMENT; a well-formed pod the policy forbids is
PERMISSION_DENIED (`PolicyDenied`), every violation named by the request field it came from:
`pod_override_yaml.` or `template_yaml.` plus the path inside that document when the value was set
there, `command[0]` for the task's own command, `pod.` plus the path in the final pod otherwise
(a named template, or a value the launcher filled in).

Pure: no gRPC, no Kubernetes, no store. LaunchTask, BatchLaunchTasks and RenderPod all use it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.launcher import podspec
from services.launcher.policy import Path_, PodPolicy, Violation
from services.launcher.templates import TemplateCatalog
from shepherd.v1 import launcher_service_pb2 as pb
from shepherd.v1 import task_pb2
from shepherd.validation import InvalidField, check_text

MAX_COMMAND_ARGS = 256
MAX_ARG_LEN = 32 * 1024
MAX_TEMPLATE_NAME = 253
_BASE_ARGS = ("spec", "containers", f"[{podspec.MAIN_CONTAINER}]", "args")


class PolicyDenied(InvalidField):
    """The pod is well formed but the pod policy forbids it. `violations` lists every reason; the
    first is this error's own field and problem."""

    def __init__(self, violations: Sequence[InvalidField]) -> None:
        super().__init__(violations[0].field, violations[0].problem)
        self.violations = list(violations)


@dataclass(frozen=True)
class Rendered:
    """The final pod a request would create, and the policy's verdict on it."""

    pod: dict[str, Any]
    template: str  # the named template used; empty for an inline template_yaml
    violations: list[InvalidField]


class Admission:
    def __init__(
        self, templates: TemplateCatalog, policy: PodPolicy, *, executor_id: str, namespace: str
    ) -> None:
        self._templates = templates
        self._policy = policy
        self._executor_id = executor_id
        self._namespace = namespace
        self._check_templates()

    def render(self, request: pb.LaunchTaskRequest) -> Rendered:
        """The pod for a request whose key is valid. Raises InvalidField for a malformed request and
        UnknownTemplate for a template name that is not configured; policy violations are returned."""
        command = list(request.command)
        if not 1 <= len(command) <= MAX_COMMAND_ARGS:
            raise InvalidField("command", f"must have 1 to {MAX_COMMAND_ARGS} arguments (got {len(command)})")
        for i, arg in enumerate(command):
            check_text(arg, f"command[{i}]", max_len=MAX_ARG_LEN)
        if request.template_name and request.template_yaml:
            raise InvalidField("template_yaml", "give template_name or template_yaml, not both")
        if request.template_yaml:
            template = podspec.parse_pod_document(request.template_yaml, "template_yaml")
            name = ""
        else:
            check_text(request.template_name, "template_name", max_len=MAX_TEMPLATE_NAME, required=False)
            name = request.template_name or self._templates.default
            template = self._templates.get(name)
        override = None
        if request.pod_override_yaml:
            override = podspec.parse_pod_document(request.pod_override_yaml, "pod_override_yaml")
            podspec.check_override(override, "pod_override_yaml")
        pod = podspec.build_pod(
            template,
            request.key,
            command,
            override=override,
            executor_id=self._executor_id,
            namespace=self._namespace,
        )
        rules = self._policy.rules(name)
        self._policy.secure_defaults(pod, rules)
        inline = not name
        violations = [_attribute(v, override, template, inline) for v in self._policy.check(pod, rules)]
        return Rendered(pod, name, violations)

    def admit(self, request: pb.LaunchTaskRequest) -> dict[str, Any]:
        """The pod to create for a request, or InvalidField / PolicyDenied / UnknownTemplate."""
        rendered = self.render(request)
        if rendered.violations:
            raise PolicyDenied(rendered.violations)
        return rendered.pod

    def _check_templates(self) -> None:
        """A named template that breaks its policy would fail every launch: refuse it at start.
        (Commands are left out: the probe's own command is not a real one.)"""
        probe = task_pb2.TaskKey(dag_id="probe", task_id="probe", run_id=uuid.uuid4().hex, try_number=1)
        for name in self._templates.names:
            rules = self._policy.rules(name).model_copy(update={"allowed_commands": None})
            pod = podspec.merge_pod(
                self._templates.get(name),
                probe,
                ["probe"],
                override=None,
                executor_id=self._executor_id,
                namespace=self._namespace,
            )
            self._policy.secure_defaults(pod, rules)
            if violations := self._policy.check(pod, rules):
                problems = "; ".join(f"{v.where}: {v.problem}" for v in violations)
                raise ValueError(f"pod template {name!r} breaks the pod policy: {problems}")


def _attribute(violation: Violation, override: Any, template: Any, inline: bool) -> InvalidField:
    """The request field a violation comes from: the layer that set the offending value, or that
    added the container it is missing from."""
    path, where = violation.path, violation.where
    if override is not None and _has(override, path):
        return InvalidField(f"pod_override_yaml.{where}", violation.problem)
    if inline and _has(template, path):
        return InvalidField(f"template_yaml.{where}", violation.problem)
    if path[:4] == _BASE_ARGS and len(path) == 5:
        return InvalidField(f"command{path[4]}", violation.problem)
    container = path[:3]
    if len(path) > 3 and container[1] in ("containers", "initContainers"):
        if override is not None and _has(override, container) and not _has(template, container):
            return InvalidField(f"pod_override_yaml.{where}", violation.problem)
        if inline and _has(template, container):
            return InvalidField(f"template_yaml.{where}", violation.problem)
    return InvalidField(f"pod.{where}", violation.problem)


def _has(doc: Any, path: Path_) -> bool:
    """Whether a document sets the value at `path` (list items named `[name]` or `[index]`)."""
    node = doc
    for part in path:
        if part.startswith("[") and isinstance(node, list):
            key = part[1:-1]
            named = [item for item in node if isinstance(item, dict) and item.get("name") == key]
            if named:
                node = named[0]
            elif key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return False
        elif isinstance(node, dict) and node.get(part) is not None:
            node = node[part]
        else:
            return False
    return True
