"""Beyond Airflow: nothing is lost or doubled when parts of the system restart mid-run (Airflow
#33402), and every pod that needs deleting gets exactly one delete call (Airflow #72803), counted
in the API server's own audit log."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2
TASKS = 1000


RECONCILER = "system:serviceaccount:shepherd:reconciler"


def deletes_by_pod(audit_log: Path, pods: set[str], user: str = RECONCILER) -> Counter[str]:
    """Delete calls per pod made by `user`, from the API server's audit log."""
    counts: Counter[str] = Counter()
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if (
            entry.get("verb") == "delete"
            and entry.get("stage") == "ResponseComplete"
            and entry.get("user", {}).get("username") == user
            and ref.get("name") in pods
        ):
            counts[ref["name"]] += 1
    return counts


async def test_restarting_every_part_mid_run_loses_and_duplicates_nothing(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    stack = ServiceStack(cluster, tmp_path, executor_id=f"restart-{unique_name('x')[-6:]}")
    stack.start()
    run = unique_name("restart")
    keys = [task_key(dag_id="restart", task_id=f"t{i}", run_id=run) for i in range(TASKS)]
    fail = {i for i in range(TASKS) if i % 10 == 0}
    try:
        async with SchedulerClient.connect(stack) as client:

            async def launch(i: int) -> None:
                annotations = {"sim.shepherd.dev/run-time": f"{2 + i % 5}s"}
                if i in fail:
                    annotations["sim.shepherd.dev/outcome"] = "fail"
                await client.launch(keys[i], annotations=annotations)

            for start in range(0, TASKS, 100):  # launch in waves while parts restart under them
                await asyncio.gather(*(launch(i) for i in range(start, min(TASKS, start + 100))))
                wave = start // 100
                if wave == 2:
                    stack.restart("watcher")
                elif wave == 4:
                    stack.restart("reconciler")
                elif wave == 6:
                    stack.restart("launcher", sig=signal.SIGKILL)  # not even a graceful stop
                elif wave == 8:
                    Cluster().restart("kube-apiserver")
            tasks = await asyncio.gather(*(client.final(k, timeout=240) for k in keys))
            await asyncio.sleep(2)  # let any duplicate show itself
            terminal = Counter(
                podmeta.key_string(c.task.key)
                for changes in client.changes.values()
                for c in changes
                if c.task.state in TERMINAL and c.task.key.run_id == run
            )
    finally:
        stack.stop_all()

    def history(name: str) -> list[str]:
        return [S.TaskState.Name(c.task.state) for c in client.changes.get(name, [])]

    missing = [podmeta.key_string(k) for k in keys if podmeta.key_string(k) not in terminal]
    doubled = [name for name, count in terminal.items() if count > 1]
    assert not missing, f"{len(missing)} tasks never reached a terminal state, e.g. " + "; ".join(
        f"{n.split(chr(31))[1]}: {history(n)}" for n in missing[:5]
    )
    assert not doubled, f"{len(doubled)} terminal transitions were delivered twice, e.g. " + "; ".join(
        f"{n.split(chr(31))[1]}: {history(n)}" for n in doubled[:5]
    )
    states = Counter(t.state for t in tasks)
    assert states[S.TASK_STATE_FAILED] == len(fail)
    assert states[S.TASK_STATE_SUCCEEDED] == TASKS - len(fail)


async def test_every_finished_pod_gets_exactly_one_delete_call(cluster: ClusterInfo, tmp_path: Path) -> None:
    stack = ServiceStack(
        cluster, tmp_path, executor_id=f"deletes-{unique_name('x')[-6:]}"
    )  # default timeouts
    stack.start()
    run = unique_name("deletes")
    keys = [task_key(dag_id="deletes", task_id=f"t{i}", run_id=run) for i in range(TASKS)]
    failing = set(range(0, TASKS, 4))  # failed pods are kept (marked done): they need no delete
    try:
        async with SchedulerClient.connect(stack) as client:

            async def launch(i: int) -> None:
                annotations = {"sim.shepherd.dev/run-time": "500ms"}
                if i in failing:
                    annotations["sim.shepherd.dev/outcome"] = "fail"
                await client.launch(keys[i], annotations=annotations)

            for start in range(0, TASKS, 100):
                await asyncio.gather(*(launch(i) for i in range(start, min(TASKS, start + 100))))
            tasks = await asyncio.gather(*(client.final(k, timeout=240) for k in keys))
            await asyncio.sleep(3)  # deletes are issued after the transition is committed
    finally:
        stack.stop_all()
    assert Counter(t.state for t in tasks) == {
        S.TASK_STATE_SUCCEEDED: TASKS - len(failing),
        S.TASK_STATE_FAILED: len(failing),
    }
    deletes = deletes_by_pod(Cluster().audit_log, {podmeta.pod_name(k) for k in keys})
    succeeded = {podmeta.pod_name(keys[i]) for i in range(TASKS) if i not in failing}
    assert set(deletes) == succeeded
    assert set(deletes.values()) == {1}
