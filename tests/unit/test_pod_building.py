"""Pods are built as template -> generated -> override, with the documented merge rules."""

from __future__ import annotations

from typing import Any

import pytest

from services.launcher import podspec
from shepherd import podmeta
from shepherd.validation import InvalidField
from tests.helpers import task_key

TEMPLATE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"labels": {"team": "data"}, "annotations": {"owner": "etl"}},
    "spec": {
        "serviceAccountName": "worker",
        "nodeSelector": {"pool": "batch"},
        "initContainers": [{"name": "fetch", "image": "busybox"}],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [
            {
                "name": "base",
                "image": "worker:1",
                "env": [{"name": "A", "value": "template"}, {"name": "B", "value": "template"}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
            }
        ],
    },
}


def build(override: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    return podspec.build_pod(
        TEMPLATE,
        task_key(),
        ["run", "--task"],
        override=override,
        executor_id="exec-a",
        namespace="shepherd",
        **kwargs,
    )


def test_the_generated_layer_names_the_pod_and_sets_the_command_in_base() -> None:
    pod = build()
    assert pod["metadata"]["name"] == podmeta.pod_name(task_key())
    assert pod["spec"]["containers"][0]["args"] == ["run", "--task"]
    assert pod["spec"]["restartPolicy"] == "Never"


def test_labels_and_annotations_from_all_layers_are_merged() -> None:
    pod = build({"metadata": {"labels": {"tier": "gold"}, "annotations": {"note": "x"}}})
    assert pod["metadata"]["labels"]["team"] == "data"
    assert pod["metadata"]["labels"]["tier"] == "gold"
    assert pod["metadata"]["labels"][podmeta.LABEL_EXECUTOR] == "exec-a"
    assert pod["metadata"]["annotations"]["owner"] == "etl"
    assert pod["metadata"]["annotations"]["note"] == "x"
    assert pod["metadata"]["annotations"][podmeta.ANNOTATION_DAG_ID] == "etl_daily"


def test_the_override_wins_on_scalars() -> None:
    pod = build(
        {"spec": {"serviceAccountName": "special", "containers": [{"name": "base", "image": "worker:2"}]}}
    )
    assert pod["spec"]["serviceAccountName"] == "special"
    assert pod["spec"]["containers"][0]["image"] == "worker:2"


def test_env_is_concatenated_and_a_later_entry_replaces_the_same_name() -> None:
    pod = build(
        {
            "spec": {
                "containers": [
                    {
                        "name": "base",
                        "env": [{"name": "B", "value": "override"}, {"name": "C", "value": "override"}],
                    }
                ]
            }
        }
    )
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env == {"A": "template", "B": "override", "C": "override", "SHEPHERD_TASK_POD": "true"}
    assert [e["name"] for e in pod["spec"]["containers"][0]["env"]].count("B") == 1


def test_volumes_mounts_and_init_containers_are_concatenated() -> None:
    pod = build(
        {
            "spec": {
                "volumes": [{"name": "data", "emptyDir": {}}],
                "initContainers": [{"name": "migrate", "image": "tool"}],
                "containers": [{"name": "base", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            }
        }
    )
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["scratch", "data"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["fetch", "migrate"]
    assert [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == ["/scratch", "/data"]


def test_mappings_like_resources_merge_key_by_key() -> None:
    pod = build({"spec": {"containers": [{"name": "base", "resources": {"requests": {"cpu": "4"}}}]}})
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "1Gi"}


def test_a_sidecar_in_the_override_is_added_next_to_base() -> None:
    pod = build({"spec": {"containers": [{"name": "sidecar", "image": "proxy"}]}})
    assert [c["name"] for c in pod["spec"]["containers"]] == ["base", "sidecar"]


def test_the_override_can_choose_the_namespace() -> None:
    pod = build({"metadata": {"namespace": "team-b"}})
    assert pod["metadata"]["namespace"] == "team-b"  # which ones are allowed is the pod policy's call


def test_a_namespace_that_is_not_a_dns_label_is_refused() -> None:
    with pytest.raises(InvalidField) as err:
        build({"metadata": {"namespace": "Not_A_Label"}})
    assert err.value.field == "pod_override_yaml.metadata.namespace"


def test_inputs_are_not_modified() -> None:
    before = repr(TEMPLATE)
    build({"spec": {"containers": [{"name": "base", "env": [{"name": "Z", "value": "1"}]}]}})
    assert repr(TEMPLATE) == before


def test_a_pod_without_an_image_is_refused_naming_the_container() -> None:
    template = {"spec": {"containers": [{"name": "base"}]}}
    with pytest.raises(InvalidField, match="no image") as err:
        podspec.build_pod(template, task_key(), ["x"], override=None, executor_id="e", namespace="shepherd")
    assert err.value.field == "pod.spec.containers[base].image"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("spec: [unclosed", "pod_override_yaml"),
        ("- a list", "pod_override_yaml"),
        ("kind: Deployment", "pod_override_yaml.kind"),
        ("spec: 3", "pod_override_yaml.spec"),
        ("spec: {containers: {}}", "pod_override_yaml.spec.containers"),
    ],
)
def test_malformed_documents_are_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidField) as err:
        podspec.parse_pod_document(text, "pod_override_yaml")
    assert err.value.field == field


def test_json_is_accepted_as_well_as_yaml() -> None:
    assert podspec.parse_pod_document('{"metadata": {"labels": {"a": "b"}}}', "x")["metadata"]["labels"] == {
        "a": "b"
    }


@pytest.mark.parametrize(
    "override",
    [{"metadata": {"name": "mine"}}, {"metadata": {"labels": {"shepherd.dev/executor-id": "other"}}}],
)
def test_an_override_cannot_forge_the_pod_identity(override: dict[str, Any]) -> None:
    with pytest.raises(InvalidField):
        podspec.check_override(override, "pod_override_yaml")
