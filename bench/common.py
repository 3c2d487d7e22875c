"""What the benchmark scenarios share: pod clean-up, percentiles, process memory, reporting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd.kube import KubeClient, load_connection
from shepherd.taskstates import TERMINAL
from shepherd.v1 import reconciler_service_pb2, reconciler_service_pb2_grpc, task_pb2

RESULTS = Path(__file__).resolve().parent / "results"


async def run_changes(
    reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub, run: str
) -> AsyncIterator[tuple[task_pb2.TaskStateChange, float]]:
    """Every task-state change of one benchmark run (by run_id), with its monotonic arrival time."""
    async for reply in reconciler.WatchTaskStates(reconciler_service_pb2.WatchTaskStatesRequest()):
        now = time.monotonic()
        for change in reply.changes:
            if change.task.key.run_id == run:
                yield change, now


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of unsorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each named process uses between start() and stop(): where a phase's time goes."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: round(cpu_seconds(pid) - self._start[name], 2) for name, pid in self.pids.items()}


def stack_meter(stack: ServiceStack) -> CpuMeter:
    """A CpuMeter over the control plane's processes and the three services."""
    control_plane = Cluster().supervisor
    return CpuMeter(
        {
            **{
                name: pid
                for name in ("etcd", "kube-apiserver", "kube-scheduler", "kwok")
                if (pid := control_plane.pid(name)) is not None
            },
            **{name: proc.pid for name, proc in stack.procs.items()},
        }
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.asynccontextmanager
async def admin_kube(cluster: ClusterInfo, *, max_connections: int = 128) -> AsyncIterator[KubeClient]:
    """A client with the cluster's admin identity, closed on exit."""
    kube = KubeClient(load_connection(cluster.admin_kubeconfig), max_connections=max_connections)
    try:
        yield kube
    finally:
        await kube.close()


async def clear_pods(cluster: ClusterInfo, selector: str, *, timeout_s: float = 300) -> None:
    """Delete every pod matching `selector` (as admin, in one call) and wait until they are gone."""
    path = f"/api/v1/namespaces/{cluster.namespace}/pods"
    async with admin_kube(cluster) as kube:
        await kube._request("DELETE", path, params={"labelSelector": selector, "gracePeriodSeconds": "0"})
    if not await wait_until_gone(cluster, selector, timeout_s=timeout_s):
        raise TimeoutError(f"pods matching {selector} were not gone after {timeout_s}s")


async def cancel_run(
    stack: ServiceStack, dag_id: str, run: str, *, expected: int, timeout_s: float = 300
) -> None:
    """Tear a run down as a scheduler would: cancel its tasks (the reconciler deletes their pods once),
    then wait until no pod of this executor is left. Deleting the pods behind the reconciler's back
    instead would make it relaunch those still Pending, as it must for pods lost before they ran."""
    deadline = time.monotonic() + timeout_s
    async with stack.scheduler_stubs() as (_, reconciler):
        while True:  # the reconciler may still be catching up on the launcher's events
            tasks, token = [], ""
            while True:
                page = await reconciler.ListTasks(
                    reconciler_service_pb2.ListTasksRequest(page_size=1000, page_token=token, dag_id=dag_id)
                )
                tasks += [t for t in page.tasks if t.key.run_id == run]
                token = page.next_page_token
                if not token:
                    break
            if len(tasks) >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        gate = asyncio.Semaphore(64)

        async def cancel(key: task_pb2.TaskKey) -> None:
            async with gate:
                await reconciler.CancelTask(
                    reconciler_service_pb2.CancelTaskRequest(key=key, reason="benchmark teardown")
                )

        await asyncio.gather(*(cancel(t.key) for t in tasks if t.state not in TERMINAL))
    selector = f"shepherd.dev/executor-id={stack.executor_id}"
    if not await wait_until_gone(stack.cluster, selector, timeout_s=max(1.0, deadline - time.monotonic())):
        raise TimeoutError(f"pods matching {selector} were not gone after {timeout_s}s")


async def wait_until_gone(cluster: ClusterInfo, selector: str, *, timeout_s: float) -> bool:
    """Poll until no pod matches `selector`; False if some are still there after `timeout_s`."""
    async with admin_kube(cluster) as kube:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            page = await kube.list_pods(cluster.namespace, label_selector=selector, limit=1)
            if not page.get("items"):
                return True
            await asyncio.sleep(0.5)
        return False


@dataclass
class Report:
    """Figures of one benchmark run, printed as a table and saved as JSON."""

    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def save(self) -> Path:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"bench-{self.started.replace(':', '')}.json"
        path.write_text(
            json.dumps(
                {
                    "started": self.started,
                    "figures": self.figures,
                    "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
                },
                indent=2,
            )
        )
        return path

    def print(self) -> None:
        print("\n== targets")
        for name, ok, detail in self.checks:
            print(f"  [{'met' if ok else 'MISSED'}] {name}: {detail}")
