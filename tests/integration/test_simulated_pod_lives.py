"""Pods on the local cluster live a real life, steered by annotations a user could write.

kube-scheduler really binds them (or leaves them Pending for a real reason) and kwok moves
them through their phases; these tests pin the documented sim.shepherd.dev behaviours.
"""

from __future__ import annotations

from typing import Any

import pytest

from controlplane import ClusterInfo
from tests.helpers import core_api, eventually, make_pod, unique_name

pytestmark = pytest.mark.integration


def _create(cluster: ClusterInfo, **kwargs: Any) -> tuple[Any, str]:
    api = core_api(cluster.admin_kubeconfig)
    name = unique_name("sim")
    api.create_namespaced_pod(cluster.namespace, make_pod(name, **kwargs))
    return api, name


def _status(api: Any, cluster: ClusterInfo, name: str) -> Any:
    return api.read_namespaced_pod_status(name, cluster.namespace).status


def test_a_plain_pod_is_scheduled_runs_and_succeeds(cluster: ClusterInfo) -> None:
    api, name = _create(cluster, annotations={"sim.shepherd.dev/run-time": "200ms"})
    status = eventually(lambda: (s := _status(api, cluster, name)).phase == "Succeeded" and s, what="success")
    assert status.container_statuses[0].state.terminated.exit_code == 0
    assert api.read_namespaced_pod(name, cluster.namespace).spec.node_name.startswith("kwok-node-")
    api.delete_namespaced_pod(name, cluster.namespace)


def test_a_pod_fails_with_the_exit_code_it_was_told(cluster: ClusterInfo) -> None:
    api, name = _create(
        cluster,
        annotations={
            "sim.shepherd.dev/outcome": "fail",
            "sim.shepherd.dev/exit-code": "3",
            "sim.shepherd.dev/run-time": "200ms",
        },
    )
    status = eventually(
        lambda: (s := _status(api, cluster, name)).phase == "Failed" and s, what="phase Failed"
    )
    terminated = status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    api.delete_namespaced_pod(name, cluster.namespace)


def test_a_pod_can_hit_an_image_pull_error_and_stay_pending(cluster: ClusterInfo) -> None:
    api, name = _create(cluster, annotations={"sim.shepherd.dev/outcome": "waiting"})
    status = eventually(
        lambda: (s := _status(api, cluster, name)).container_statuses and s, what="container statuses"
    )
    assert status.phase == "Pending"
    assert status.container_statuses[0].state.waiting.reason == "ErrImagePull"
    api.delete_namespaced_pod(name, cluster.namespace)


@pytest.mark.parametrize(
    ("unschedulable", "why"),
    [
        ({"cpu": "100000"}, "Insufficient cpu"),
        ({"node_selector": {"disktype": "no-such-node"}}, "didn't match Pod's node affinity/selector"),
    ],
    ids=["larger-than-any-node", "selector-no-node-has"],
)
def test_a_pod_no_node_can_take_stays_pending_as_unschedulable(
    cluster: ClusterInfo, unschedulable: dict[str, Any], why: str
) -> None:
    api, name = _create(cluster, **unschedulable)

    def scheduled_condition() -> Any:
        conditions = _status(api, cluster, name).conditions or []
        return next((c for c in conditions if c.type == "PodScheduled"), None)

    condition = eventually(scheduled_condition, what="the scheduler's verdict")
    assert (condition.status, condition.reason) == ("False", "Unschedulable")
    assert why in condition.message
    assert _status(api, cluster, name).phase == "Pending"
    api.delete_namespaced_pod(name, cluster.namespace)
