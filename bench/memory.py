"""Resident memory of each service with 5,000 live tasks (pods Running on kwok nodes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import rss_mb, run_changes
from controlplane import ClusterInfo
from controlplane.stack import SERVICES, ServiceStack
from shepherd.v1 import (
    launcher_service_pb2,
    task_pb2,
)


async def measure(cluster: ClusterInfo, stack: ServiceStack, tasks: int) -> dict[str, Any]:
    run = f"memory-{int(time.time())}"
    running = 0
    all_running = asyncio.Event()
    async with stack.scheduler_stubs() as (launcher, reconciler):

        async def subscribe() -> None:
            nonlocal running
            async for change, _ in run_changes(reconciler, run):
                if change.task.state == task_pb2.TASK_STATE_RUNNING:
                    running += 1
                    if running == tasks:
                        all_running.set()

        subscriber = asyncio.create_task(subscribe())
        override = "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"
        for start in range(0, tasks, 500):
            batch = [
                launcher_service_pb2.LaunchTaskRequest(
                    key=task_pb2.TaskKey(
                        dag_id="memory", task_id=f"t{i}", run_id=run, try_number=1, map_index=-1
                    ),
                    command=["run"],
                    pod_override_yaml=override,
                )
                for i in range(start, min(tasks, start + 500))
            ]
            await launcher.BatchLaunchTasks(launcher_service_pb2.BatchLaunchTasksRequest(requests=batch))
        began = time.monotonic()
        await asyncio.wait_for(all_running.wait(), timeout=900)
        settle_s = time.monotonic() - began
        rss = {name: round(rss_mb(stack.procs[name].pid), 1) for name in SERVICES}
        subscriber.cancel()
        await asyncio.gather(subscriber, return_exceptions=True)
    return {"live_tasks": tasks, "rss_mb": rss, "seconds_until_all_running": round(settle_s, 1)}
