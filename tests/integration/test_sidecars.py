"""A task's outcome is its `base` container's, whatever sidecars do: a mesh proxy or a log shipper
that keeps running after `base` exits does not keep the task RUNNING, and native sidecars (init
containers with restartPolicy Always) keep working.

kwok ends every container of a pod together, so it cannot show a sidecar outliving `base`. These
pods are bound to a node that no kubelet or kwok manages, and the test plays the kubelet: it
writes each pod status itself, as an admin, the way bench/event_latency.py does.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import task_pb2
from tests.helpers import core_api, eventually, task_key, unique_name
from tests.helpers.audit import RECONCILER, calls_by_pod
from tests.helpers.eventually import eventually_off_loop
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2
UNMANAGED_NODE = "sidecar-test-unmanaged-node"
# Bound to a node nobody runs; no grace period, so a delete removes the pod at once.
ON_UNMANAGED_NODE = f"spec: {{nodeName: {UNMANAGED_NODE}, terminationGracePeriodSeconds: 0"
WITH_SIDECAR = ON_UNMANAGED_NODE + ", containers: [{name: istio-proxy, image: example.invalid/proxy:1}]}"
WITH_NATIVE_SIDECAR = (
    ON_UNMANAGED_NODE
    + ", initContainers: [{name: istio-proxy, image: example.invalid/proxy:1, restartPolicy: Always}]}"
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def running() -> dict[str, Any]:
    return {"running": {"startedAt": _now()}}


def exited(code: int) -> dict[str, Any]:
    reason = "Completed" if code == 0 else "Error"
    return {"terminated": {"exitCode": code, "reason": reason, "startedAt": _now(), "finishedAt": _now()}}


def container(name: str, state: dict[str, Any]) -> dict[str, Any]:
    ready = "running" in state
    return {
        "name": name,
        "image": "example.invalid/x:1",
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "state": state,
    }


class Kubelet:
    """Writes the status of pods on the unmanaged node, as a kubelet would."""

    def __init__(self, cluster: ClusterInfo) -> None:
        self.admin = core_api(cluster.admin_kubeconfig)
        self.namespace = cluster.namespace

    def wait_created(self, name: str) -> None:
        eventually(
            lambda: (
                self.admin.list_namespaced_pod(self.namespace, field_selector=f"metadata.name={name}").items
            ),
            what=f"pod {name} to exist",
        )

    def status(
        self,
        name: str,
        phase: str,
        containers: list[dict[str, Any]],
        init: list[dict[str, Any]] | None = None,
    ) -> None:
        status: dict[str, Any] = {"phase": phase, "containerStatuses": containers}
        if init is not None:
            status["initContainerStatuses"] = init
        self.admin.patch_namespaced_pod_status(
            name, self.namespace, {"status": status}, _content_type="application/merge-patch+json"
        )

    def gone(self, name: str) -> bool:
        return not self.admin.list_namespaced_pod(
            self.namespace, field_selector=f"metadata.name={name}"
        ).items

    def labels(self, name: str) -> dict[str, str]:
        return self.admin.read_namespaced_pod(name, self.namespace).metadata.labels or {}


async def test_base_decides_the_outcome_while_sidecars_keep_running(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    # Its own stack, with the default pending timeout: these pods are Pending until the test moves them.
    stack = ServiceStack(cluster, tmp_path, executor_id=f"sidecar-{unique_name('x')[-6:]}")
    stack.start()
    kubelet = Kubelet(cluster)
    ok, bad, native = (task_key(task_id=unique_name(n)) for n in ("sc-ok", "sc-bad", "sc-native"))
    names = [podmeta.pod_name(key) for key in (ok, bad, native)]
    ok_pod, bad_pod, native_pod = names
    try:
        async with SchedulerClient.connect(stack) as client:
            for key in (ok, bad):
                await client.launch(key, override=WITH_SIDECAR)
            await client.launch(native, override=WITH_NATIVE_SIDECAR)
            for name in (ok_pod, bad_pod):
                kubelet.wait_created(name)
                kubelet.status(
                    name, "Running", [container("base", running()), container("istio-proxy", running())]
                )
            kubelet.wait_created(native_pod)
            kubelet.status(
                native_pod,
                "Running",
                [container("base", running())],
                init=[container("istio-proxy", running())],
            )
            for key in (ok, bad, native):
                await client.reached(key, S.TASK_STATE_RUNNING)

            # base ends; the sidecar keeps running, so the pod stays Running.
            kubelet.status(
                ok_pod, "Running", [container("base", exited(0)), container("istio-proxy", running())]
            )
            kubelet.status(
                bad_pod, "Running", [container("base", exited(3)), container("istio-proxy", running())]
            )
            succeeded, failed = await client.final(ok), await client.final(bad)
            assert succeeded.state == S.TASK_STATE_SUCCEEDED
            assert failed.state == S.TASK_STATE_FAILED
            assert (failed.failure.container.name, failed.failure.container.exit_code) == ("base", 3)
            assert "'base' exited with code 3" in failed.failure.message
            # Cleaned up by the default policy: the succeeded pod deleted, the failed one kept and
            # marked done.
            await eventually_off_loop(
                lambda: kubelet.gone(ok_pod), what="the succeeded task's pod to be deleted"
            )
            await eventually_off_loop(
                lambda: kubelet.labels(bad_pod).get(podmeta.LABEL_DONE) == "true",
                what="the failed task's pod to be marked done",
            )

            # A native sidecar (an init container that keeps running) beside base: as before.
            kubelet.status(
                native_pod,
                "Running",
                [container("base", exited(0))],
                init=[container("istio-proxy", running())],
            )
            assert (await client.final(native)).state == S.TASK_STATE_SUCCEEDED
            await eventually_off_loop(
                lambda: kubelet.gone(native_pod), what="the native-sidecar task's pod to be deleted"
            )
            finals = {
                name: [
                    c.task.state for c in client.changes[podmeta.key_string(key)] if c.task.state in TERMINAL
                ]
                for name, key in zip(names, (ok, bad, native), strict=True)
            }
    finally:
        stack.stop_all()
        for name in names:
            if not kubelet.gone(name):
                kubelet.admin.delete_namespaced_pod(name, cluster.namespace, grace_period_seconds=0)
    assert finals == {
        ok_pod: [S.TASK_STATE_SUCCEEDED],
        bad_pod: [S.TASK_STATE_FAILED],
        native_pod: [S.TASK_STATE_SUCCEEDED],
    }
    # One action per pod: the two succeeded pods got one delete each, the kept one none. The
    # services are stopped, so no call can still be on its way.
    assert calls_by_pod(Cluster().audit_log, "delete", RECONCILER, set(names)) == {ok_pod: 1, native_pod: 1}
