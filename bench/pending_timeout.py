"""Pending-timeout precision at scale: how late after its deadline is each stuck pod deleted?

5,000 tasks get pods no node can take, so all of them sit Pending. Each pod's deadline is its
creationTimestamp + the pending timeout (what the reconciler uses). Lateness is the time from the
deadline to the API server receiving the reconciler's delete, taken from the API server's audit
log, so no client clock or delivery delay is in the figure.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench.common import admin_kube, percentile, run_changes, stack_meter, wait_until_gone
from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.timestamps import epoch_seconds
from shepherd.v1 import (
    launcher_service_pb2,
    task_pb2,
)

RECONCILER = "system:serviceaccount:shepherd:reconciler"
UNSCHEDULABLE = "spec: {containers: [{name: base, resources: {requests: {cpu: '100000'}}}]}"


def _per_second(used: dict[str, float], seconds: float) -> dict[str, float]:
    return {name: round(value / seconds, 2) for name, value in used.items()}


async def _creation_times(cluster: ClusterInfo, selector: str) -> dict[str, float]:
    async with admin_kube(cluster) as kube:
        pods, _ = await kube.list_all_pods(cluster.namespace, label_selector=selector)
    return {p["metadata"]["name"]: epoch_seconds(p["metadata"]["creationTimestamp"]) for p in pods}


def stack_flags(timeout_s: float) -> dict[str, list[str]]:
    """The services' flags for this scenario: the pending timeout it measures."""
    return {"reconciler": ["--pending-timeout-s", str(timeout_s)]}


async def measure(
    cluster: ClusterInfo, stack: ServiceStack, tasks: int, timeout_s: float, launch_rate: float
) -> dict[str, Any]:
    """`launch_rate` (pods/s, 0 for as fast as possible) sets how densely the deadlines fall later.
    The stack must run with stack_flags(timeout_s); it is stopped before the audit log is read."""
    run = f"pending-{int(time.time())}"
    keys = [
        task_pb2.TaskKey(dag_id="pending", task_id=f"t{i}", run_id=run, try_number=1, map_index=-1)
        for i in range(tasks)
    ]
    cpu: dict[str, dict[str, float]] = {}
    created: dict[str, float] = {}
    timed_out = 0
    decided: dict[str, float] = {}  # pod name -> when the reconciler applied PendingTimeout (its clock)
    done = asyncio.Event()
    try:
        async with stack.scheduler_stubs() as (launcher, reconciler):

            async def subscribe() -> None:
                nonlocal timed_out
                async for change, _ in run_changes(reconciler, run):
                    if change.task.failure.reason == "PendingTimeout":
                        decided[change.task.pod_name] = change.change_time.ToNanoseconds() / 1e9
                        timed_out += 1
                        if timed_out == tasks:
                            done.set()

            subscriber = asyncio.create_task(subscribe())
            first_launch = time.monotonic()
            chunk = 50 if launch_rate else 500
            for start in range(0, tasks, chunk):
                batch = [
                    launcher_service_pb2.LaunchTaskRequest(
                        key=k, command=["run"], pod_override_yaml=UNSCHEDULABLE
                    )
                    for k in keys[start : start + chunk]
                ]
                await launcher.BatchLaunchTasks(launcher_service_pb2.BatchLaunchTasksRequest(requests=batch))
                if launch_rate:
                    await asyncio.sleep(
                        max(0.0, first_launch + (start + chunk) / launch_rate - time.monotonic())
                    )
            # Where the CPU goes while the pods just wait, and while they expire.
            meter = stack_meter(stack)
            await asyncio.sleep(5)
            # The deadline starts from each pod's creationTimestamp (whole seconds), read from the
            # pods themselves: the audit log's receive time can fall in the second before it.
            created = await _creation_times(cluster, f"shepherd.dev/executor-id={stack.executor_id}")
            meter.start()
            waiting_from = time.monotonic()
            await asyncio.sleep(max(0.0, first_launch + timeout_s - 1 - time.monotonic()))
            cpu["waiting"] = _per_second(meter.stop(), time.monotonic() - waiting_from)
            meter.start()
            expiring_from = time.monotonic()
            await asyncio.wait_for(done.wait(), timeout=timeout_s + 900)
            cpu["expiring"] = _per_second(meter.stop(), time.monotonic() - expiring_from)
            await wait_until_gone(
                stack.cluster, f"shepherd.dev/executor-id={stack.executor_id}", timeout_s=120
            )  # the last deletes land in the audit log
            subscriber.cancel()
            await asyncio.gather(subscriber, return_exceptions=True)
    finally:
        stack.stop_all()
    names = {podmeta.pod_name(k) for k in keys}
    deleted: dict[str, float] = {}
    for line in Cluster().audit_log.read_text().splitlines():
        entry = json.loads(line)
        name = (entry.get("objectRef") or {}).get("name")
        if name not in names or entry.get("stage") != "ResponseComplete":
            continue
        if entry.get("verb") == "delete" and entry.get("user", {}).get("username") == RECONCILER:
            deleted.setdefault(name, epoch_seconds(entry["requestReceivedTimestamp"]))
    lateness = [deleted[n] - (created[n] + timeout_s) for n in deleted if n in created]
    per_second: dict[float, int] = {}
    for when in created.values():
        per_second[when] = per_second.get(when, 0) + 1
    # Where the lateness goes: deadline -> the reconciler applies the timeout -> the API server
    # receives the delete (same host, same clock).
    to_decision = [decided[n] - (created[n] + timeout_s) for n in decided if n in created]
    to_delete = [deleted[n] - decided[n] for n in deleted if n in decided]
    return {
        "pending_pods": tasks,
        "timeout_s": timeout_s,
        "timed_out": timed_out,
        "deleted": len(deleted),
        "deadlines_per_second_max": max(per_second.values(), default=0),
        "lateness_p50_s": round(percentile(lateness, 50), 3),
        "lateness_p99_s": round(percentile(lateness, 99), 3),
        "lateness_max_s": round(max(lateness), 3) if lateness else float("nan"),
        "deadline_to_timeout_applied_p99_s": round(percentile(to_decision, 99), 3),
        "deadline_to_timeout_applied_max_s": round(max(to_decision), 3) if to_decision else float("nan"),
        "timeout_applied_to_delete_p99_s": round(percentile(to_delete, 99), 3),
        "timeout_applied_to_delete_max_s": round(max(to_delete), 3) if to_delete else float("nan"),
        # Cores busy per process while the pods wait, and while they expire (of the machine's 2).
        "cpu_cores_busy": cpu,
    }
