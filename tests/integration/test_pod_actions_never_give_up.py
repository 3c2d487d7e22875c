"""A pod delete is never given up: refused for a while (the reconciler's Role loses `delete`),
it is retried until the refusal is lifted and then goes through exactly once; and the safety
sweep cleans up finished pods nobody was cleaning up (an event missed, an action dropped by an
earlier version). The API server's audit log is the witness. The Role is changed on a throw-away
cluster of this module's own, never on the shared one."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.kube.errors import FORBIDDEN_RETRIES
from shepherd.v1 import task_pb2
from tests.helpers import core_api, make_pod, task_key, unique_name
from tests.helpers.audit import RECONCILER
from tests.helpers.cluster import spare_settings
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2
ROLE = next(
    doc
    for doc in yaml.safe_load_all(
        (Path(__file__).resolve().parents[2] / "deploy/rbac/reconciler.yaml").read_text()
    )
    if doc["kind"] == "Role"
)
QUICK = {"sim.shepherd.dev/run-time": "300ms"}


@pytest.fixture(scope="module")
def rbac_cluster(
    tmp_path_factory: pytest.TempPathFactory, cluster: ClusterInfo
) -> Iterator[tuple[Cluster, ClusterInfo]]:
    """Its own cluster, since the test takes `delete` away from the reconciler's Role."""
    spare = Cluster(spare_settings(tmp_path_factory.mktemp("rbac")))
    info = spare.up()
    yield spare, info
    spare.down()


def allow_delete(spare: Cluster, allowed: bool) -> None:
    role: dict[str, Any] = json.loads(json.dumps(ROLE))
    if not allowed:
        for rule in role["rules"]:
            rule["verbs"] = [verb for verb in rule["verbs"] if verb != "delete"]
    spare._admin().apply(role)


def deletes(spare: Cluster, pod: str) -> list[int]:
    """The answers (HTTP codes) to the reconciler's delete calls for `pod`, in order."""
    codes = []
    for line in spare.audit_log.read_text().splitlines():
        entry = json.loads(line)
        if (
            entry.get("verb") == "delete"
            and entry.get("stage") == "ResponseComplete"
            and entry.get("user", {}).get("username") == RECONCILER
            and (entry.get("objectRef") or {}).get("name") == pod
        ):
            codes.append(int((entry.get("responseStatus") or {}).get("code") or 0))
    return codes


async def until(probe: Any, what: str, timeout: float = 90.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if result := probe():
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {probe()!r})")


def pod_exists(info: ClusterInfo, name: str) -> bool:
    pods = core_api(info.admin_kubeconfig).list_namespaced_pod(
        info.namespace, field_selector=f"metadata.name={name}"
    )
    return any(p.metadata.deletion_timestamp is None for p in pods.items)


@pytest.fixture
def stack(
    rbac_cluster: tuple[Cluster, ClusterInfo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ServiceStack]:
    spare, info = rbac_cluster
    # A refusal is asked again at most this far apart (the default is a minute).
    monkeypatch.setenv("SHEPHERD_ACTION_RETRY_CAP_S", "2")
    stack = ServiceStack(
        info,
        tmp_path,
        executor_id=unique_name("actions"),
        flags={"reconciler": ["--pending-check-interval-s", "1"]},
    )
    stack.start()
    yield stack
    stack.stop_all()
    allow_delete(spare, True)


async def test_a_refused_delete_is_retried_until_allowed_then_done_exactly_once(
    rbac_cluster: tuple[Cluster, ClusterInfo], stack: ServiceStack
) -> None:
    spare, info = rbac_cluster
    allow_delete(spare, False)
    key = task_key(dag_id="refused", task_id=unique_name("t"))
    pod = podmeta.pod_name(key)
    async with SchedulerClient.connect(stack) as client:
        await client.launch(key, annotations=QUICK)
        assert (await client.final(key)).state == S.TASK_STATE_SUCCEEDED
        # More refusals than the 403 budget of a single call: the action outlived it.
        await until(lambda: len(deletes(spare, pod)) > FORBIDDEN_RETRIES + 1, "repeated refused deletes")
        assert set(deletes(spare, pod)) == {403}
        assert pod_exists(info, pod)
        log = stack.tail("reconciler", 5000)
        assert "pod action failed; retrying until it goes through" in log
        assert pod in log

        allow_delete(spare, True)
        await until(lambda: not pod_exists(info, pod), "the pod to be deleted once allowed")
        # A sentinel's pod, finished and deleted after ours, shows the runner has moved on.
        sentinel = task_key(dag_id="refused", task_id=unique_name("sentinel"))
        await client.launch(sentinel, annotations=QUICK)
        await client.final(sentinel)
        await until(lambda: deletes(spare, podmeta.pod_name(sentinel)), "the sentinel's delete")
    codes = deletes(spare, pod)
    assert [c for c in codes if c < 300] == [200], codes
    assert codes[-1] == 200, "no delete call after the one that went through"
    assert client.states(key).count(S.TASK_STATE_SUCCEEDED) == 1


async def test_a_dropped_delete_is_picked_up_by_the_sweep_exactly_once(
    rbac_cluster: tuple[Cluster, ClusterInfo], stack: ServiceStack
) -> None:
    """An earlier version gave up after a few failures and recorded the action as done: the pod
    leaked for good. The sweep finds the pod still uncleaned and deletes it."""
    spare, info = rbac_cluster
    allow_delete(spare, False)
    key = task_key(dag_id="dropped", task_id=unique_name("t"))
    pod = podmeta.pod_name(key)
    async with SchedulerClient.connect(stack) as client:
        await client.launch(key, annotations=QUICK)
        assert (await client.final(key)).state == S.TASK_STATE_SUCCEEDED
    await until(lambda: deletes(spare, pod), "a refused delete")
    stack.stop("reconciler", sig=signal.SIGTERM)
    with sqlite3.connect(stack.workdir / "reconciler.db") as db:
        assert db.execute("UPDATE pod_actions SET done = 1 WHERE name = ?", (pod,)).rowcount == 1
    allow_delete(spare, True)
    stack.start(("reconciler",))
    await until(lambda: not pod_exists(info, pod), "the sweep to delete the leaked pod")
    sentinel_done = await _run_sentinel(stack)
    assert sentinel_done
    codes = deletes(spare, pod)
    assert [c for c in codes if c < 300] == [200], codes
    assert codes[-1] == 200


async def test_a_finished_pod_whose_events_were_missed_is_cleaned_up_by_the_sweep(
    rbac_cluster: tuple[Cluster, ClusterInfo], stack: ServiceStack
) -> None:
    """With the watcher down nothing reports the pod's end: the sweep finds it, its task is
    recorded SUCCEEDED and the pod deleted once."""
    _, info = rbac_cluster
    spare = rbac_cluster[0]
    stack.stop("watcher", sig=signal.SIGKILL)
    key = task_key(dag_id="missed", task_id=unique_name("t"))
    name = podmeta.pod_name(key)
    admin = core_api(info.admin_kubeconfig)
    admin.create_namespaced_pod(
        info.namespace,
        make_pod(
            name,
            labels=podmeta.task_labels(key, stack.executor_id),
            annotations={**podmeta.task_annotations(key, 1), **QUICK},
        ),
    )
    await until(lambda: not pod_exists(info, name), "the sweep to delete the finished pod", timeout=120)
    stack.start(("watcher",))
    assert await _run_sentinel(stack)
    codes = deletes(spare, name)
    assert codes == [200], codes


async def _run_sentinel(stack: ServiceStack) -> bool:
    async with SchedulerClient.connect(stack) as client:
        sentinel = task_key(dag_id="sweep", task_id=unique_name("sentinel"))
        await client.launch(sentinel, annotations=QUICK)
        return (await client.final(sentinel)).state == S.TASK_STATE_SUCCEEDED
