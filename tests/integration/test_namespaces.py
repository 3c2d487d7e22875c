"""Worker pods in one namespace, an explicit list, or all namespaces, with the RBAC variants in
deploy/variants/: namespaced Roles for a list, ClusterRoles for all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.cluster import spare_settings
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
VARIANTS = Path(__file__).resolve().parents[2] / "deploy" / "variants"
S = task_pb2


def variant(name: str, namespace: str | None = None) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((VARIANTS / name).glob("*.yaml")):
        text = path.read_text()
        if namespace:
            text = text.replace("team-a", namespace)
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


async def run_two_tasks(stack: ServiceStack, other: str) -> tuple[task_pb2.Task, task_pb2.Task]:
    async with SchedulerClient.connect(stack) as client:
        home, away = task_key(task_id=unique_name("home")), task_key(task_id=unique_name("away"))
        await client.launch(home, annotations={"sim.shepherd.dev/run-time": "200ms"})
        await client.launch(
            away,
            override=f"metadata: {{namespace: {other}, annotations: {{sim.shepherd.dev/run-time: 200ms}}}}",
        )
        return await client.final(home), await client.final(away)


async def test_a_namespace_list_needs_only_namespaced_roles(cluster: ClusterInfo, tmp_path: Path) -> None:
    other = unique_name("team")
    docs = variant("namespace-list", other)
    assert {d["kind"] for d in docs} == {"Namespace", "ServiceAccount", "Role", "RoleBinding"}
    admin = Cluster()._admin()
    for doc in docs:
        admin.apply(doc)
    stack = ServiceStack(
        cluster,
        tmp_path,
        executor_id=f"list-{other[-8:]}",
        flags={name: ["--watch-namespaces", other] for name in ("launcher", "watcher", "reconciler")},
    )
    stack.start()
    try:
        home, away = await run_two_tasks(stack, other)
    finally:
        stack.stop_all()
    assert (home.state, home.namespace) == (S.TASK_STATE_SUCCEEDED, cluster.namespace)
    assert (away.state, away.namespace) == (S.TASK_STATE_SUCCEEDED, other)


@pytest.fixture
def wide_cluster(tmp_path: Path, cluster: ClusterInfo) -> Iterator[ClusterInfo]:
    """A throw-away cluster: cluster-wide grants stay out of the shared one."""
    spare = Cluster(spare_settings(tmp_path / "wide"))
    info = spare.up()
    admin = spare._admin()
    for doc in variant("all-namespaces"):
        admin.apply(doc)
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "anywhere"}})
    yield info
    spare.down()


async def test_all_namespaces_works_with_the_cluster_role_variant(
    wide_cluster: ClusterInfo, tmp_path: Path
) -> None:
    stack = ServiceStack(
        wide_cluster,
        tmp_path,
        executor_id="wide",
        flags={name: ["--watch-namespaces", "*"] for name in ("launcher", "watcher", "reconciler")},
    )
    stack.start()
    try:
        home, away = await run_two_tasks(stack, "anywhere")
    finally:
        stack.stop_all()
    assert (home.state, away.state) == (S.TASK_STATE_SUCCEEDED, S.TASK_STATE_SUCCEEDED)
    assert away.namespace == "anywhere"
