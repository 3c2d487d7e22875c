"""A try queued again after it handed control back (a deferred task resuming, a reschedule-mode
sensor poking again) is a launch of its own: the next resumption of the same TaskKey gets its own
pod and its own task, tracked apart from the earlier run, which keeps its outcome."""

from __future__ import annotations

import pytest

from controlplane import Cluster, ClusterInfo
from shepherd import podmeta
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.audit import AuditLog
from tests.helpers.kube import core_api
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
QUICK = {"sim.shepherd.dev/run-time": "300ms"}


async def test_a_resumption_after_the_first_run_finished_gets_a_second_pod(
    client: SchedulerClient, cluster: ClusterInfo
) -> None:
    audit = AuditLog.from_now(Cluster().audit_log)
    first = task_key(task_id=unique_name("resume"))
    again = task_pb2.TaskKey()
    again.CopyFrom(first)
    again.resumption = 1

    r0 = await client.launch(first, annotations=QUICK)
    assert not r0.already_existed
    assert (await client.final(first)).state == task_pb2.TASK_STATE_SUCCEEDED
    r1 = await client.launch(again, annotations={**QUICK, "sim.shepherd.dev/outcome": "fail"})
    assert not r1.already_existed
    assert r1.launch.pod_name == podmeta.pod_name(again) != r0.launch.pod_name == podmeta.pod_name(first)
    assert (await client.final(again)).state == task_pb2.TASK_STATE_FAILED

    # Tracked apart: the first run keeps its outcome, each has its own single terminal transition.
    for key, state in ((first, task_pb2.TASK_STATE_SUCCEEDED), (again, task_pb2.TASK_STATE_FAILED)):
        reply: rpb.GetTaskResponse = await client.reconciler.GetTask(rpb.GetTaskRequest(key=key), timeout=30)
        assert reply.task.key == key
        assert reply.task.state == state
        assert reply.task.pod_name == podmeta.pod_name(key)
        assert client.states(key).count(state) == 1, client.states(key)
    # A repeat of either launch is still the same launch.
    assert (await client.launch(again, annotations=QUICK)).already_existed
    assert (await client.launch(first, annotations=QUICK)).already_existed

    pods = {podmeta.pod_name(first), podmeta.pod_name(again)}
    await audit.until_created(*pods)
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)
    # The failed run's pod is kept (a succeeded one is deleted): it carries its resumption.
    pod = core_api(cluster.admin_kubeconfig).read_namespaced_pod(podmeta.pod_name(again), cluster.namespace)
    assert pod.metadata.labels[podmeta.LABEL_RESUMPTION] == "1"
    assert pod.metadata.annotations[podmeta.ANNOTATION_RESUMPTION] == "1"
