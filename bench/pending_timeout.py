"""Pending-timeout precision at scale: how late after its deadline is each stuck pod deleted?

5,000 tasks get pods no node can take, so all of them sit Pending. Each pod's deadline is its
creationTimestamp + the pending timeout (what the reconciler uses). Lateness is the time from the
deadline to the API server receiving the reconciler's delete, taken from the API server's audit
log, so no client clock or delivery delay is in the figure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from bench.common import clear_pods, percentile, run_changes, wait_until_gone
from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import (
    launcher_service_pb2,
    task_pb2,
)

RECONCILER = "system:serviceaccount:shepherd:reconciler"
UNSCHEDULABLE = "spec: {containers: [{name: base, resources: {requests: {cpu: '100000'}}}]}"


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def measure(cluster: ClusterInfo, workdir: Path, tasks: int, timeout_s: float) -> dict[str, Any]:
    stack = ServiceStack(
        cluster,
        workdir,
        executor_id=f"pending-{int(time.time())}",
        flags={"reconciler": ["--pending-timeout-s", str(timeout_s)]},
    )
    stack.start()
    run = f"pending-{int(time.time())}"
    keys = [
        task_pb2.TaskKey(dag_id="pending", task_id=f"t{i}", run_id=run, try_number=1, map_index=-1)
        for i in range(tasks)
    ]
    timed_out = 0
    done = asyncio.Event()
    try:
        async with stack.scheduler_stubs() as (launcher, reconciler):

            async def subscribe() -> None:
                nonlocal timed_out
                async for change, _ in run_changes(reconciler, run):
                    if change.task.failure.reason == "PendingTimeout":
                        timed_out += 1
                        if timed_out == tasks:
                            done.set()

            subscriber = asyncio.create_task(subscribe())
            for start in range(0, tasks, 500):
                batch = [
                    launcher_service_pb2.LaunchTaskRequest(
                        key=k, command=["run"], pod_override_yaml=UNSCHEDULABLE
                    )
                    for k in keys[start : start + 500]
                ]
                await launcher.BatchLaunchTasks(launcher_service_pb2.BatchLaunchTasksRequest(requests=batch))
            await asyncio.wait_for(done.wait(), timeout=timeout_s + 900)
            await wait_until_gone(
                stack.cluster, f"shepherd.dev/executor-id={stack.executor_id}", timeout_s=120
            )  # the last deletes land in the audit log
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)
    finally:
        stack.stop_all()
    names = {podmeta.pod_name(k) for k in keys}
    created: dict[str, float] = {}
    deleted: dict[str, float] = {}
    for line in Cluster().audit_log.read_text().splitlines():
        entry = json.loads(line)
        name = (entry.get("objectRef") or {}).get("name")
        if name not in names or entry.get("stage") != "ResponseComplete":
            continue
        if entry.get("verb") == "create" and not (entry.get("objectRef") or {}).get("subresource"):
            # creationTimestamp has whole seconds: the reconciler's deadline starts from the truncated time.
            created.setdefault(name, float(int(_ts(entry["requestReceivedTimestamp"]))))
        elif entry.get("verb") == "delete" and entry.get("user", {}).get("username") == RECONCILER:
            deleted.setdefault(name, _ts(entry["requestReceivedTimestamp"]))
    lateness = [deleted[n] - (created[n] + timeout_s) for n in deleted if n in created]
    await clear_pods(cluster, f"shepherd.dev/executor-id={stack.executor_id}")
    return {
        "pending_pods": tasks,
        "timeout_s": timeout_s,
        "timed_out": timed_out,
        "deleted": len(deleted),
        "lateness_p50_s": round(percentile(lateness, 50), 3),
        "lateness_p99_s": round(percentile(lateness, 99), 3),
        "lateness_max_s": round(max(lateness), 3) if lateness else float("nan"),
    }
