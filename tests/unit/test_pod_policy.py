"""The pod policy is checked on the final pod (template -> generated -> override), so no layer gets
around it; each violation is named by the request field it came from; each rule can be relaxed in
the policy file, for every template or one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.launcher.admission import Admission, PolicyDenied
from services.launcher.policy import PodPolicy
from services.launcher.settings import LauncherSettings
from services.launcher.templates import TemplateCatalog
from shepherd.v1 import launcher_service_pb2 as pb
from shepherd.validation import InvalidField
from tests.helpers import task_key

TEMPLATES = LauncherSettings.load([]).templates_dir
OVERRIDE = "pod_override_yaml"


def admission(
    policy_text: str = "", *, allowed: tuple[str, ...] = (), tmp_path: Path | None = None, **kwargs: Any
) -> Admission:
    templates = TemplateCatalog(TEMPLATES, "default")
    path = None
    if policy_text:
        assert tmp_path is not None
        path = tmp_path / "policy.yaml"
        path.write_text(policy_text)
    policy = PodPolicy.load(
        path,
        worker_service_account="shepherd-worker",
        allowed_commands=allowed,
        namespaces=kwargs.get("namespaces", ["shepherd", "team-b"]),
        template_names=templates.names,
    )
    return Admission(templates, policy, executor_id="exec", namespace="shepherd")


def request(
    override: str = "", command: tuple[str, ...] = ("run-task",), **fields: Any
) -> pb.LaunchTaskRequest:
    return pb.LaunchTaskRequest(key=task_key(), command=list(command), pod_override_yaml=override, **fields)


def denied(adm: Admission, req: pb.LaunchTaskRequest) -> list[str]:
    with pytest.raises(PolicyDenied) as err:
        adm.admit(req)
    return [v.field for v in err.value.violations]


def test_the_default_template_makes_a_pod_of_the_restricted_standard() -> None:
    pod = admission().admit(request())
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "shepherd-worker"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = spec["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def test_containers_that_set_no_security_fields_get_the_restricted_values() -> None:
    pod = admission().admit(request("spec: {initContainers: [{name: fetch, image: busybox}]}"))
    context = pod["spec"]["initContainers"][0]["securityContext"]
    assert context == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


PROBES = [
    (
        "spec: {containers: [{name: base, securityContext: {privileged: true}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.privileged",
    ),
    ("spec: {hostPID: true}", f"{OVERRIDE}.spec.hostPID"),
    ("spec: {hostNetwork: true}", f"{OVERRIDE}.spec.hostNetwork"),
    ("spec: {hostIPC: true}", f"{OVERRIDE}.spec.hostIPC"),
    (
        "spec: {containers: [{name: base, ports: [{containerPort: 80, hostPort: 80}]}]}",
        f"{OVERRIDE}.spec.containers[base].ports[0].hostPort",
    ),
    ("spec: {volumes: [{name: root, hostPath: {path: /}}]}", f"{OVERRIDE}.spec.volumes[root].hostPath"),
    ("spec: {volumes: [{name: n, nfs: {server: s, path: /}}]}", f"{OVERRIDE}.spec.volumes[n].nfs"),
    ("spec: {serviceAccountName: reconciler}", f"{OVERRIDE}.spec.serviceAccountName"),
    ("spec: {serviceAccount: launcher}", f"{OVERRIDE}.spec.serviceAccount"),
    ("spec: {automountServiceAccountToken: true}", f"{OVERRIDE}.spec.automountServiceAccountToken"),
    (
        "spec: {volumes: [{name: t, projected: {sources: [{serviceAccountToken: {path: token}}]}}]}",
        f"{OVERRIDE}.spec.volumes[t].projected.sources[0].serviceAccountToken",
    ),
    ("metadata: {namespace: elsewhere}", f"{OVERRIDE}.metadata.namespace"),
    (
        "spec: {containers: [{name: base, securityContext: {capabilities: {add: [SYS_ADMIN]}}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.capabilities.add",
    ),
    (
        "spec: {containers: [{name: base, securityContext: {capabilities: {drop: [NET_RAW]}}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.capabilities.drop",
    ),
    ("spec: {securityContext: {runAsNonRoot: false}}", f"{OVERRIDE}.spec.securityContext.runAsNonRoot"),
    ("spec: {securityContext: {runAsUser: 0}}", f"{OVERRIDE}.spec.securityContext.runAsUser"),
    (
        "spec: {containers: [{name: base, securityContext: {runAsNonRoot: false}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.runAsNonRoot",
    ),
    (
        "spec: {containers: [{name: base, securityContext: {allowPrivilegeEscalation: true}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.allowPrivilegeEscalation",
    ),
    (
        "spec: {securityContext: {seccompProfile: {type: Unconfined}}}",
        f"{OVERRIDE}.spec.securityContext.seccompProfile.type",
    ),
    (
        "spec: {containers: [{name: base, securityContext: {appArmorProfile: {type: Unconfined}}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.appArmorProfile.type",
    ),
    (
        "spec: {containers: [{name: base, securityContext: {procMount: Unmasked}}]}",
        f"{OVERRIDE}.spec.containers[base].securityContext.procMount",
    ),
    (
        "spec: {securityContext: {sysctls: [{name: kernel.msgmax, value: '1'}]}}",
        f"{OVERRIDE}.spec.securityContext.sysctls[0].name",
    ),
    (
        "spec: {securityContext: {seLinuxOptions: {type: spc_t}}}",
        f"{OVERRIDE}.spec.securityContext.seLinuxOptions.type",
    ),
    (
        "spec: {initContainers: [{name: setup, image: x, securityContext: {privileged: true}}]}",
        f"{OVERRIDE}.spec.initContainers[setup].securityContext.privileged",
    ),
]


@pytest.mark.parametrize(("override", "field"), PROBES, ids=[f.split(".", 1)[1] for _, f in PROBES])
def test_each_probe_is_denied_naming_the_field(override: str, field: str) -> None:
    assert denied(admission(), request(override)) == [field]


def test_the_issue_s_pod_is_denied_for_every_reason_at_once() -> None:
    override = (
        "spec:\n"
        "  serviceAccountName: reconciler\n"
        "  automountServiceAccountToken: true\n"
        "  hostPID: true\n"
        "  hostNetwork: true\n"
        "  volumes: [{name: root, hostPath: {path: /}}]\n"
        "  containers:\n"
        "  - name: base\n"
        "    securityContext: {privileged: true}\n"
        "    volumeMounts: [{name: root, mountPath: /host}]\n"
    )
    assert denied(admission(), request(override)) == [
        f"{OVERRIDE}.spec.serviceAccountName",
        f"{OVERRIDE}.spec.automountServiceAccountToken",
        f"{OVERRIDE}.spec.hostNetwork",
        f"{OVERRIDE}.spec.hostPID",
        f"{OVERRIDE}.spec.volumes[root].hostPath",
        f"{OVERRIDE}.spec.containers[base].securityContext.privileged",
    ]


def test_an_inline_template_is_named_as_such() -> None:
    template = (
        "spec: {hostNetwork: true, containers: [{name: base, image: w, securityContext: {privileged: true}}]}"
    )
    assert denied(admission(), request(template_yaml=template)) == [
        "template_yaml.spec.hostNetwork",
        "template_yaml.spec.containers[base].securityContext.privileged",
    ]


COMMAND_PROBES = [
    ("", ("rm", "-rf", "/"), "command[0]"),
    (
        "spec: {containers: [{name: base, command: [sh, -c]}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.containers[base].command[0]",
    ),
    (
        "spec: {containers: [{name: base, args: [sh, -c, x]}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.containers[base].args[0]",
    ),
    (
        "spec: {initContainers: [{name: setup, image: x, command: [curl]}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.initContainers[setup].command[0]",
    ),
    (
        "spec: {containers: [{name: side, image: x, args: [nc, -l]}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.containers[side].args[0]",
    ),
    (
        "spec: {containers: [{name: side, image: x}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.containers[side].command",
    ),
    (
        "spec: {containers: [{name: base, livenessProbe: {exec: {command: [sh, -c, x]}}}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.containers[base].livenessProbe.exec.command[0]",
    ),
    (
        "spec: {containers: [{name: base, lifecycle: {postStart: {exec: {command: [sh]}}}}]}",
        ("run-task",),
        f"{OVERRIDE}.spec.containers[base].lifecycle.postStart.exec.command[0]",
    ),
]


@pytest.mark.parametrize(
    ("override", "command", "field"), COMMAND_PROBES, ids=[f for _, _, f in COMMAND_PROBES]
)
def test_the_command_allow_list_covers_what_really_runs(
    override: str, command: tuple[str, ...], field: str
) -> None:
    assert denied(admission(allowed=("run-task", "python")), request(override, command)) == [field]


def test_null_values_mean_unset() -> None:
    override = (
        "spec: {hostNetwork: null, serviceAccountName: null, securityContext: null,"
        " volumes: [{name: v, hostPath: null, projected: null, emptyDir: {}}],"
        " containers: [{name: base, securityContext: {privileged: null, capabilities: null}}]}"
    )
    pod = admission().admit(request(override))
    assert pod["spec"]["serviceAccountName"] == "shepherd-worker"


def test_allowed_commands_pass_in_every_container() -> None:
    override = "spec: {containers: [{name: side, image: x, command: [python, -m, side]}]}"
    admission(allowed=("run-task", "python")).admit(request(override, ("run-task", "--x")))


def test_rules_relax_per_template_and_for_all(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    for name in ("default", "gpu"):
        (tmp_path / "templates" / f"{name}.yaml").write_text((TEMPLATES / "default.yaml").read_text())
    templates = TemplateCatalog(tmp_path / "templates", "default")
    path = tmp_path / "policy.yaml"
    path.write_text(
        "default: {allowed_capabilities: [NET_BIND_SERVICE, NET_RAW]}\n"
        "templates:\n"
        "  gpu: {allow_privileged: true, allow_host_path: true, service_accounts: [gpu-worker]}\n"
    )
    policy = PodPolicy.load(
        path,
        worker_service_account="shepherd-worker",
        namespaces=["shepherd"],
        template_names=templates.names,
    )
    adm = Admission(templates, policy, executor_id="e", namespace="shepherd")
    privileged = (
        "spec: {serviceAccountName: gpu-worker, volumes: [{name: dev, hostPath: {path: /dev}}],"
        " containers: [{name: base, securityContext: {privileged: true, capabilities: {add: [NET_RAW]}}}]}"
    )
    adm.admit(request(privileged, template_name="gpu"))
    assert denied(adm, request(privileged)) == [
        f"{OVERRIDE}.spec.serviceAccountName",
        f"{OVERRIDE}.spec.volumes[dev].hostPath",
        f"{OVERRIDE}.spec.containers[base].securityContext.privileged",
    ]


def test_render_reports_violations_without_raising() -> None:
    rendered = admission().render(request("spec: {hostNetwork: true}"))
    assert rendered.pod["spec"]["hostNetwork"] is True
    assert [v.field for v in rendered.violations] == [f"{OVERRIDE}.spec.hostNetwork"]
    assert rendered.template == "default"


def test_a_malformed_request_is_invalid_not_denied() -> None:
    with pytest.raises(InvalidField) as err:
        admission().admit(request("spec: {hostNetwrk: true}"))
    assert not isinstance(err.value, PolicyDenied)
    assert err.value.field == f"{OVERRIDE}.spec.hostNetwrk"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("default: {allow_privileged: yes-please}", "allow_privileged"),
        ("default: {alow_privileged: true}", "alow_privileged"),
        ("templates: {nosuch: {allow_root: true}}", "nosuch"),
        ("default: {service_accounts: [reconciler]}", "services' own"),
        ("default: {namespaces: [elsewhere]}", "not watched"),
        ("default: &a {}\ntemplates: {default: *a}", "aliases"),
    ],
)
def test_a_bad_policy_file_stops_the_launcher_naming_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        admission(text, tmp_path=tmp_path)


def test_a_template_that_breaks_its_policy_stops_the_launcher(tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_text("spec: {hostNetwork: true, containers: [{name: base, image: x}]}")
    templates = TemplateCatalog(tmp_path, "default")
    policy = PodPolicy.load(None, worker_service_account="w", namespaces=None, template_names=templates.names)
    with pytest.raises(ValueError, match=r"'default' breaks the pod policy: spec.hostNetwork"):
        Admission(templates, policy, executor_id="e", namespace="shepherd")


def test_the_worker_account_cannot_be_a_service_s_own() -> None:
    with pytest.raises(ValueError, match="services' own"):
        PodPolicy.load(None, worker_service_account="launcher", namespaces=None, template_names=[])
