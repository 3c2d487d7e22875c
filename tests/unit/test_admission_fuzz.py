"""Admission in-process, fuzzed: any template, override and command either makes a pod that can be
sent as JSON, or is refused with InvalidField (PolicyDenied included) or UnknownTemplate; nothing
else escapes. The same generated documents go to the services over gRPC in the integration fuzz
test; here they are many more, and cheap."""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.launcher.admission import Admission
from services.launcher.policy import PodPolicy
from services.launcher.settings import LauncherSettings
from services.launcher.templates import TemplateCatalog, UnknownTemplate
from shepherd.v1 import launcher_service_pb2 as pb
from shepherd.validation import InvalidField
from tests.helpers import fuzzing, task_key

_TEMPLATES = TemplateCatalog(LauncherSettings.load([]).templates_dir, "default")
_ADMISSION = Admission(
    _TEMPLATES,
    PodPolicy.load(
        None,
        worker_service_account="shepherd-worker",
        allowed_commands=("run-task", "python"),
        namespaces=["shepherd"],
        template_names=_TEMPLATES.names,
    ),
    executor_id="fuzz",
    namespace="shepherd",
)


@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    override=fuzzing.POD_TEXT,
    template=st.one_of(st.just(""), fuzzing.POD_TEXT),
    command=st.lists(st.sampled_from(["run-task", "python", "sh", ""]), max_size=3),
)
def test_admission_refuses_or_renders_anything(override: str, template: str, command: list[str]) -> None:
    request = pb.LaunchTaskRequest(
        key=task_key(), command=command, template_yaml=template, pod_override_yaml=override
    )
    try:
        rendered = _ADMISSION.render(request)
    except InvalidField as err:
        if not err.field:
            raise AssertionError(f"a refusal without a field: {err}") from err
        return
    except UnknownTemplate:
        return
    orjson.dumps(rendered.pod)
    assert all(v.field for v in rendered.violations)
