"""Carrying out a plan's faults, one at a time, against real processes, etcd and file systems.

Every fault undoes itself (a paused process is continued, a store is emptied and made writable,
a killed service is started again) even when the run is interrupted; `release()` is the last
word in any case. What each fault did is printed with its time, so a failure reads as a story.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos.disks import StoreDisks
from chaos.plan import Fault, Plan, PlannedFault
from chaos.scenarios import Kind
from chaos.scheduler import TaskRecord
from chaos.services import ServiceSet
from controlplane import Cluster
from controlplane.kubeapi import AdminClient, ApiError
from shepherd.v1 import task_pb2

APISERVER = "kube-apiserver"
_GAP_MARGIN_S = 2.0  # past the watcher's watch timeout, so the API server has ended its watch
_BACK_UP_S = 60.0  # how long a restarted service may take to serve before the next fault hits it


@dataclass
class Injector:
    plan: Plan
    cluster: Cluster
    services: ServiceSet
    disks: StoreDisks | None
    admin: AdminClient
    namespace: str
    records: dict[str, TaskRecord]
    watch_timeout_s: int
    started: float
    say: Callable[[str], None]
    injected: list[str] = field(default_factory=list)
    _stopped: set[str] = field(default_factory=set)  # paused with SIGSTOP: "kube-apiserver", "watcher"
    _broken_stores: dict[str, Fault] = field(default_factory=dict)
    _restarts: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # by service

    def _note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] fault {text}"
        self.injected.append(line)
        self.say(line)

    async def run(self) -> None:
        for fault in self.plan.faults:
            wait = self.started + fault.at_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.inject(fault)
        await self.settle()

    async def settle(self) -> None:
        """Wait until every killed service has been started again."""
        if self._restarts:
            await asyncio.gather(*self._restarts.values())

    async def inject(self, fault: PlannedFault) -> None:
        kind = fault.fault
        if fault.target in self._restarts:
            # Still coming back from an earlier fault: let it, so this fault hits a working service.
            await self._restarts[fault.target]
            await self.services.wait_serving(fault.target, _BACK_UP_S)
        if kind in (Fault.KILL_WATCHER, Fault.KILL_RECONCILER, Fault.KILL_LAUNCHER):
            self._kill(fault, env=None)
        elif kind is Fault.SQLITE_COMMIT:
            self._kill(fault, env={"SHEPHERD_FAILPOINTS": f"sqlite.commit={fault.count}"})
        elif kind is Fault.STOP_APISERVER:
            await self._stop_apiserver(fault.hold_s)
        elif kind is Fault.RESTART_APISERVER:
            self._note(f"{kind.value}: restarting it")
            began = time.monotonic()
            await asyncio.to_thread(self.cluster.restart, APISERVER)
            self._note(f"{kind.value}: ready again after {time.monotonic() - began:.1f}s")
        elif kind is Fault.COMPACT_ETCD:
            await self._compaction_gap(fault)
        elif kind is Fault.DISK_FULL:
            await self._broken_store(fault, full=True)
        elif kind is Fault.DISK_READ_ONLY:
            await self._broken_store(fault, full=False)

    def kill_launcher_after_batch(self) -> None:
        """Called by the launching side the instant the launcher answered a batch OK."""
        fault = self.plan.kill_after_batch
        if fault is not None:
            self._kill(fault, env=None)

    def _kill(self, fault: PlannedFault, env: dict[str, str] | None) -> None:
        pid = self.services.pid(fault.target)
        self.services.kill(fault.target, signal.SIGKILL)
        armed = f" with SHEPHERD_FAILPOINTS={env['SHEPHERD_FAILPOINTS']}" if env else ""
        self._note(
            f"{fault.fault.value}: kill -9 {fault.target} (pid {pid}); "
            f"restarting it in {fault.restart_after_s:.1f}s{armed}"
        )
        self._restarts[fault.target] = asyncio.create_task(
            self.services.restart_later(fault.target, fault.restart_after_s, env)
        )

    def _apiserver_pid(self) -> int:
        pid = self.cluster.supervisor.pid(APISERVER)
        if pid is None:
            raise RuntimeError("kube-apiserver of the chaos cluster is not running")
        return pid

    async def _stop_apiserver(self, hold_s: float) -> None:
        pid = self._apiserver_pid()
        self._note(f"stop-apiserver: SIGSTOP kube-apiserver (pid {pid}) for {hold_s:.1f}s")
        os.kill(pid, signal.SIGSTOP)
        self._stopped.add(APISERVER)
        try:
            await asyncio.sleep(hold_s)
        finally:
            os.kill(pid, signal.SIGCONT)
            self._stopped.discard(APISERVER)
        self._note("stop-apiserver: SIGCONT")

    async def _compaction_gap(self, fault: PlannedFault) -> None:
        """Pause the watcher until the API server has ended its watch, delete pods, compact etcd,
        continue it: its resume point is gone (410), and it must rebuild the gap from a re-list."""
        self._note(
            f"compact-etcd: SIGSTOP the watcher for its watch timeout ({self.watch_timeout_s}s) and more"
        )
        self.services.signal("watcher", signal.SIGSTOP)
        self._stopped.add("watcher")
        try:
            await asyncio.sleep(self.watch_timeout_s + _GAP_MARGIN_S)
            candidates = self._gap_candidates(fault.count)
            deleted = await asyncio.to_thread(self._delete_in_gap, candidates, fault.count)
            revision = await asyncio.to_thread(self.cluster.compact_etcd)
            self._note(
                f"compact-etcd: deleted {', '.join(deleted) or 'no pods'}; compacted etcd at {revision}"
            )
        finally:
            self.services.signal("watcher", signal.SIGCONT)
            self._stopped.discard("watcher")
        self._note("compact-etcd: SIGCONT the watcher")

    def _gap_candidates(self, count: int) -> list[tuple[TaskRecord, str, str]]:
        """Up to `count` long tasks the scheduler was told are RUNNING (so the watcher's last word
        on their pods is Running), and up to `count` unschedulable tasks still QUEUED (whose pods
        can never have run), in an order drawn from the seed."""
        rng = random.Random(self.plan.seed * 1_000_003 + len(self.injected))
        running = [
            r
            for r in self.records.values()
            if r.kind is Kind.LONG_SUCCESS and r.last_state == task_pb2.TASK_STATE_RUNNING and not r.victim
        ]
        pending = [
            r
            for r in self.records.values()
            if r.kind is Kind.UNSCHEDULABLE and r.last_state == task_pb2.TASK_STATE_QUEUED and not r.victim
        ]
        candidates = []
        for group, phase in ((running, "Running"), (pending, "Pending")):
            rng.shuffle(group)
            candidates += [(r, r.delivered[-1].pod_name, phase) for r in group[: count * 3]]
        return candidates

    def _delete_in_gap(self, candidates: list[tuple[TaskRecord, str, str]], count: int) -> list[str]:
        """Delete up to `count` pods of each phase among the candidates. Each delete is conditional
        on the resourceVersion just read, so the pod is deleted in exactly the state that decides
        what its task must end as."""
        deleted: list[str] = []
        taken = {"Running": 0, "Pending": 0}
        for record, name, phase in candidates:
            if taken[phase] < count and self._delete_if(name, phase):
                record.victim = phase.lower()
                deleted.append(f"{name} ({record.label}, {phase})")
                taken[phase] += 1
        return deleted

    def _delete_if(self, name: str, phase: str) -> bool:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{name}"
        try:
            pod = self.admin.request("GET", path)
        except (ApiError, OSError):
            return False
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        if status.get("phase") != phase or meta.get("deletionTimestamp"):
            return False
        if phase == "Pending" and pod.get("spec", {}).get("nodeName"):
            return False
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
        }
        try:
            self.admin.request("DELETE", path, body)
        except (ApiError, OSError):
            return False  # it changed since it was read (409), or is gone already
        return True

    async def _broken_store(self, fault: PlannedFault, *, full: bool) -> None:
        if self.disks is None:
            self._note(f"{fault.fault.value}: skipped (no loop-mounted stores: needs root)")
            return
        what = "full" if full else "read-only"
        self._broken_stores[fault.target] = fault.fault  # before breaking it: release() repairs it
        try:
            if full:
                taken = await asyncio.to_thread(self.disks.fill, fault.target)
                self._note(
                    f"{fault.fault.value}: {fault.target}'s store is full ({taken // 1024} KiB of ballast)"
                )
            else:
                await asyncio.to_thread(self.disks.read_only, fault.target)
                self._note(f"{fault.fault.value}: {fault.target}'s store is read-only")
            await asyncio.sleep(fault.hold_s)
        finally:
            self._repair(fault.target)
        self._note(f"{fault.fault.value}: {fault.target}'s store is no longer {what}")

    def _repair(self, target: str) -> None:
        fault = self._broken_stores.pop(target, None)
        if fault is None or self.disks is None:
            return
        if fault is Fault.DISK_FULL:
            self.disks.free(target)
        else:
            self.disks.writable(target)

    def release(self) -> None:
        """Undo whatever is still in force: continue paused processes, repair stores."""
        if APISERVER in self._stopped:
            with contextlib.suppress(ProcessLookupError, RuntimeError):
                os.kill(self._apiserver_pid(), signal.SIGCONT)
        if "watcher" in self._stopped:
            self.services.signal("watcher", signal.SIGCONT)
        self._stopped.clear()
        for target in list(self._broken_stores):
            with contextlib.suppress(Exception):
                self._repair(target)
        for task in self._restarts.values():
            task.cancel()
