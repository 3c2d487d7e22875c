"""Pods per second through Shepherd, against the raw ceiling of this API server in the same run.

Ceiling: the same pods created directly by a lean concurrent client (the aiohttp adapter and the
uvloop event loop the launcher itself uses, same ServiceAccount, same concurrency). Shepherd: the
same number of LaunchTask calls fired by ghz (over reflection, no proto files), timed by the
launcher's own stamps: from accepting the first task to the API server answering the last create.
ghz's start-up (a new process, its reflection look-up, its connections) is not Shepherd's work, so
it stays outside; the rate over ghz's whole wall time is reported next to it. Both sets of pods
then really run on kwok nodes.

Rounds are long (6,000 pods by default) and their medians are compared. While pods are being
created, the kube-scheduler binds them and kwok starts them, on the same two cores. A varying share
of that work falls after the window, and that share decides a round: 2,000-pod rounds of the same
code ranged from 0.64 to 1.30 times the raw rate. Longer rounds narrow the spread without removing
it, and the faster side (usually the raw client) leaves more of that work for after its window.
Every round prints the kube-scheduler + kwok CPU inside its window.

Each phase is also timed end to end, from its first create (raw) or accepted task (Shepherd) until
its last pod is Running, from the API server's audit log of kwok's status writes. There both sides
carry all of their pods' scheduling and starting (and kwok's 300 ms start delay), so that figure
does not depend on how much of it falls inside the create window.

The stamps are read from the launcher's store file (read-only) rather than followed live over
WatchLaunchEvents: a live follower would cost the launcher and this process CPU inside the window,
on a machine where every core is already busy, and the raw phase has no observer at all.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import fresh_stack, stack_meter
from controlplane import Cluster, ClusterInfo, ClusterSettings
from controlplane.stack import ServiceStack
from services.launcher.podspec import build_pod
from shepherd.kube import KubeClient, load_connection
from shepherd.timestamps import epoch_seconds
from shepherd.v1 import launcher_service_pb2, task_pb2

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "pod-templates" / "default.yaml"
OVERRIDE = "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"


class RunningPods:
    """When each pod first had its status written by kwok (it goes Running on that write, for the
    run-forever pods used here), followed in the API server's audit log of a fresh cluster."""

    def __init__(self, audit_log: Path) -> None:
        self._path = audit_log
        self._offset = 0
        self._partial = b""
        self.running: dict[str, float] = {}

    def _read(self) -> None:
        with self._path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            entry = json.loads(line)
            ref = entry.get("objectRef") or {}
            if ref.get("subresource") == "status" and entry.get("stage") == "ResponseComplete":
                self.running.setdefault(ref.get("name", ""), epoch_seconds(entry["stageTimestamp"]))

    async def last(self, count: int, *, timeout_s: float = 600.0) -> float:
        """When the last of `count` pods went Running (seconds since the epoch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._read()
            if len(self.running) >= count:
                return max(self.running.values())
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.running)} of {count} pods went Running in {timeout_s} s")
            await asyncio.sleep(0.25)


async def _rate_until_running(count: int, started: float) -> float:
    """Pods/s of a phase that started at `started` (epoch seconds), until its last pod is Running."""
    return count / (await RunningPods(Cluster().audit_log).last(count) - started)


async def raw_ceiling(cluster: ClusterInfo, count: int, concurrency: int, run: str) -> tuple[float, float]:
    """Pods/s of `count` direct creates with `concurrency` in flight, and when they started."""
    template = yaml.safe_load(TEMPLATE.read_text())
    override = yaml.safe_load(OVERRIDE)
    pods = [
        build_pod(
            template,
            task_pb2.TaskKey(dag_id="raw", task_id=f"t{i}", run_id=run, try_number=1, map_index=-1),
            ["run"],
            override=override,
            executor_id="bench-raw",
            namespace=cluster.namespace,
        )
        for i in range(count)
    ]
    kube = KubeClient(load_connection(cluster.kubeconfigs["launcher"]), max_connections=concurrency + 8)
    gate = asyncio.Semaphore(concurrency)

    async def create(pod: dict[str, Any]) -> None:
        async with gate:
            await kube.create_pod(cluster.namespace, pod)

    try:
        started, start = time.time(), time.monotonic()
        await asyncio.gather(*(create(pod) for pod in pods))
        return count / (time.monotonic() - start), started
    finally:
        await kube.close()


def _ghz_request(run: str, batch: int) -> tuple[str, str]:
    """ghz's method and request template: one LaunchTask, or a BatchLaunchTasks of `batch` tasks."""

    def item(suffix: str) -> dict[str, Any]:
        return {
            "key": {
                "dag_id": "bench",
                "task_id": "t{{.RequestNumber}}" + suffix,
                "run_id": run,
                "try_number": 1,
                "map_index": -1,
            },
            "command": ["run"],
            "pod_override_yaml": OVERRIDE,
        }

    if batch <= 1:
        return "shepherd.v1.LauncherService/LaunchTask", json.dumps(item(""))
    return "shepherd.v1.LauncherService/BatchLaunchTasks", json.dumps(
        {"requests": [item(f"-{i}") for i in range(batch)]}
    )


class _LaunchStoreReader:
    """The launcher's launches of one run, read from its SQLite file (WAL allows a reader in
    another process while the launcher writes)."""

    def __init__(self, path: Path, run: str) -> None:
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self._run = run

    def created(self) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM launches WHERE state = ?", (launcher_service_pb2.LAUNCH_STATE_CREATED,)
        ).fetchone()
        return int(row[0])

    def window(self) -> tuple[float, float]:
        """(first accept, last create) of the run's launches, in seconds since the epoch."""
        launches = [
            launch
            for (blob,) in self._conn.execute("SELECT launch FROM launches")
            if (launch := launcher_service_pb2.Launch.FromString(blob)).key.run_id == self._run
        ]
        first_accept = min(launch.accept_time.ToNanoseconds() for launch in launches) / 1e9
        last_create = max(launch.create_time.ToNanoseconds() for launch in launches) / 1e9
        return first_accept, last_create

    def close(self) -> None:
        self._conn.close()


async def through_shepherd(
    stack: ServiceStack, count: int, run: str, batch: int = 1
) -> tuple[float, float, dict[str, Any]]:
    """Pods/s from the first task accepted to the last pod created, with ghz as the scheduler; when
    the first task was accepted; ghz's figures. The stack must be fresh: every launch in the
    launcher's store is counted."""
    method, data = _ghz_request(run, batch)
    calls = max(1, count // max(batch, 1))
    ghz = str(ClusterSettings().bin_dir / "ghz")
    scheduler = stack.identities["scheduler"]  # mutual TLS, as the scheduler the default policy knows
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        ghz,
        *("--cacert", str(scheduler.ca), "--cert", str(scheduler.cert), "--key", str(scheduler.key)),
        "--call",
        method,
        "-d",
        data,
        "-n",
        str(calls),
        "-c",
        str(min(64, calls)),
        "--connections",
        "4",
        "--cpus",
        "1",
        "-O",
        "json",
        stack.address("launcher"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ghz failed: {err.decode()[-2000:]}")
    ghz_report = json.loads(out)
    store = _LaunchStoreReader(stack.workdir / "launcher.db", run)
    try:
        deadline = time.monotonic() + 600
        while (created := store.created()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {created} of {count} pods were created within 600 s")
            await asyncio.sleep(0.05)  # a COUNT on an index: negligible next to the launcher's work
        wall_elapsed = time.monotonic() - start
        first_accept, last_create = store.window()
    finally:
        store.close()
    latencies = {d["percentage"]: d["latency"] / 1e6 for d in ghz_report.get("latencyDistribution") or []}
    return (
        count / (last_create - first_accept),
        first_accept,
        {
            "pods_per_s_including_ghz_startup": round(count / wall_elapsed, 1),
            "ghz_rps": round(ghz_report["rps"], 1),
            "launch_rpc_p50_ms": round(latencies.get(50, float("nan")), 2),
            "launch_rpc_p99_ms": round(latencies.get(99, float("nan")), 2),
            "status_codes": ghz_report.get("statusCodeDistribution"),
        },
    )


async def measure(
    workdir: Path, count: int, rounds: int, batch: int, flags: dict[str, list[str]]
) -> dict[str, Any]:
    """Each phase of each round runs on a fresh control plane (see fresh_stack), so neither side
    inherits the other's history; the services run in both, idle in the raw phase."""
    raw_rates: list[float] = []
    shepherd_rates: list[float] = []
    running_rates: dict[str, list[float]] = {"raw": [], "shepherd": []}  # until the last is Running
    ghz_stats: dict[str, Any] = {}
    cpu: dict[str, dict[str, float]] = {}
    downstream: dict[str, list[float]] = {"raw": [], "shepherd": []}
    for r in range(rounds):
        run = f"rate-{int(time.time())}-{r}"
        async with fresh_stack(workdir, f"rate-raw-{r}", flags=flags) as (cluster, stack):
            meter = stack_meter(stack)
            meter.start()
            rate, started = await raw_ceiling(cluster, count, 64, run)
            cpu["raw"] = meter.stop()
            raw_rates.append(rate)
            running_rates["raw"].append(await _rate_until_running(count, started))
        async with fresh_stack(workdir, f"rate-shepherd-{r}", flags=flags) as (cluster, stack):
            meter = stack_meter(stack)
            meter.start()
            rate, started, stats = await through_shepherd(stack, count, run, batch)
            if rate > max(shepherd_rates, default=0.0):
                ghz_stats = stats  # the call latencies and wall-time rate of the round reported
            cpu["shepherd"] = meter.stop()
            shepherd_rates.append(rate)
            running_rates["shepherd"].append(await _rate_until_running(count, started))
        for side in downstream:
            downstream[side].append(round(cpu[side]["kube-scheduler"] + cpu[side]["kwok"], 2))
        print(
            f"  round {r + 1}: raw {raw_rates[-1]:.0f} pods/s, shepherd {rate:.0f} pods/s "
            f"(kube-scheduler + kwok CPU inside the window: raw {downstream['raw'][-1]}, "
            f"shepherd {downstream['shepherd'][-1]} core-s); until the last pod is Running: raw "
            f"{running_rates['raw'][-1]:.0f}, shepherd {running_rates['shepherd'][-1]:.0f} pods/s",
            flush=True,
        )
    raw, shepherd = max(raw_rates), max(shepherd_rates)
    median_raw, median_shepherd = statistics.median(raw_rates), statistics.median(shepherd_rates)
    return {
        "pods": count,
        "tasks_per_call": batch,
        "rounds": rounds,
        "raw_pods_per_s": round(raw, 1),
        "shepherd_pods_per_s": round(shepherd, 1),
        "ratio": round(shepherd / raw, 3),
        # Rounds swing widely on both sides (the API server competes with the kube-scheduler and
        # kwok for two cores), so the medians are reported next to the bests.
        "median_raw_pods_per_s": round(median_raw, 1),
        "median_shepherd_pods_per_s": round(median_shepherd, 1),
        "median_ratio": round(median_shepherd / median_raw, 3),
        # Why rounds differ: the scheduling and kubelet work that lands inside the create window
        # (pods created faster than they are scheduled leave more of it for after the window).
        "scheduler_and_kwok_core_seconds": downstream,
        # End to end: from the first create (raw) or accepted task (Shepherd) until the last pod is
        # Running. Both sides carry all of their pods' scheduling here, wherever it falls.
        "running_median_raw_pods_per_s": round(statistics.median(running_rates["raw"]), 1),
        "running_median_shepherd_pods_per_s": round(statistics.median(running_rates["shepherd"]), 1),
        "running_median_ratio": round(
            statistics.median(running_rates["shepherd"]) / statistics.median(running_rates["raw"]), 3
        ),
        "running_all_raw": [round(x, 1) for x in running_rates["raw"]],
        "running_all_shepherd": [round(x, 1) for x in running_rates["shepherd"]],
        "all_raw": [round(x, 1) for x in raw_rates],
        "all_shepherd": [round(x, 1) for x in shepherd_rates],
        **ghz_stats,
        # Where the CPU went in the last round (core-seconds per process; the benchmark's own client
        # and ghz are not included): the budget both phases share on this machine.
        "cpu_core_seconds_last_round": cpu,
    }
