"""What the benchmark scenarios share: fresh stacks, percentiles, process CPU and memory, reporting."""

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
                for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
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


def _busy_cores(seconds: float) -> float:
    """Cores this machine kept busy over the next `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    total, idle = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return (os.cpu_count() or 1) * (1 - (idle2 - idle) / max(1, total2 - total))


async def settle(*, below_cores: float = 0.3, timeout_s: float = 30.0) -> None:
    """Wait until the machine is nearly idle: a control plane just started is still busy for a few
    seconds (bootstrap, nodes registering, informers syncing), and that work would be measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_busy_cores, 1.0) < below_cores:
            return


@contextlib.asynccontextmanager
async def fresh_stack(
    workdir: Path, name: str, *, flags: dict[str, list[str]] | None = None
) -> AsyncIterator[tuple[ClusterInfo, ServiceStack]]:
    """A new local control plane (empty etcd) with the three services on it, stopped on exit.

    Every measured phase starts here. The API server's cost per request grows with the history
    earlier phases leave (thousands of Events, pods in the watch cache), so a raw phase run after a
    Shepherd phase, or the other way round, would be measured on a slower machine. Restarting
    takes a few seconds and makes each figure independent of what ran before it."""
    cluster = Cluster()
    cluster.down()
    info = cluster.up()
    stack = ServiceStack(
        info,
        workdir / name,
        executor_id=f"bench-{name}-{int(time.time())}",
        flags=flags or {},
        die_with_parent=True,
    )
    try:  # a service that fails to come up must not leave the others running
        stack.start()
        await settle()
        yield info, stack
    finally:
        stack.stop_all()


@contextlib.asynccontextmanager
async def admin_kube(cluster: ClusterInfo, *, max_connections: int = 128) -> AsyncIterator[KubeClient]:
    """A client with the cluster's admin identity, closed on exit."""
    kube = KubeClient(load_connection(cluster.admin_kubeconfig), max_connections=max_connections)
    try:
        yield kube
    finally:
        await kube.close()


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
    # ok None: not measured (e.g. a run too short to reach the state the target is about)
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool | None, detail: str) -> None:
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
            status = "not measured" if ok is None else "met" if ok else "MISSED"
            print(f"  [{status}] {name}: {detail}")
