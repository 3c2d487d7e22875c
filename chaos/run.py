"""One chaos run: a throw-away control plane, then per seed a fresh stack, the plan, the barrier and
the verdict.

The control plane is its own (own ports, own directories), because the faults pause and restart
its API server and compact its etcd; pod watches are served from etcd directly, so a compaction
reaches the watcher as 410 Gone. Each seed gets its own executor id, stores and log files, so
seeds sharing the control plane cannot see each other's pods.

The end of a seed is decided by barriers, never by a sleep: every acknowledged task must have
delivered a terminal transition (or the drain timeout passes, and the rest are lost); then a
sentinel task is launched through the whole pipeline, and its terminal transition shows that
every event queued before it was processed; pods left behind are then looked for until the
policy's deletes have had their chance (the sentinel's own pod must go too).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos import audit, disks, verdict
from chaos.faults import Injector
from chaos.plan import DISK_FAULTS, STATEFUL, Fault, Plan, PlannedTask, make_plan
from chaos.scenarios import Kind, pod_override
from chaos.scheduler import Scheduler, SchedulerError, TaskRecord
from chaos.services import ServiceSet
from controlplane import Cluster, ClusterInfo, ClusterSettings
from controlplane.kubeapi import AdminClient, ApiError
from controlplane.stack import SERVICES, ServiceStack, free_port
from shepherd import podmeta
from shepherd.v1 import task_pb2

RELAUNCH_BUDGET = 1  # the reconciler's default --launch-failure-retries
_SHOWN_PER_KIND = 20  # findings printed per violation and seed; the report file has them all


@dataclass(frozen=True)
class Options:
    tasks: int = 500
    duration_s: float = 60.0
    faults: frozenset[Fault] = frozenset(Fault)
    pending_timeout_s: float = 60.0
    watch_timeout_s: int = 5
    drain_timeout_s: float = 240.0
    workdir: Path | None = None
    keep: bool = False


@dataclass
class SeedResult:
    seed: int
    tasks: int
    verdict: verdict.Verdict = field(default_factory=verdict.Verdict)
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.error and self.verdict.clean


def say(text: str) -> None:
    print(text, flush=True)


def cluster_settings(root: Path) -> ClusterSettings:
    return ClusterSettings(
        state_dir=root / "cluster",
        etcd_data_dir=Path("/dev/shm") / f"{root.name}-etcd",
        nodes=1,
        etcd_client_port=free_port(),
        etcd_peer_port=free_port(),
        apiserver_port=free_port(),
        scheduler_port=free_port(),
        kwok_port=free_port(),
        controller_manager_port=free_port(),
        # A machine has one real node, and it belongs to the session's cluster; chaos needs kwok only.
        real_node=False,
        pods_watch_cache=False,
    )


def admin_client(cluster: Cluster) -> AdminClient:
    pki = cluster.pki_dir
    return AdminClient(
        "127.0.0.1",
        cluster.settings.apiserver_port,
        str(pki / "ca.crt"),
        str(pki / "admin.crt"),
        str(pki / "admin.key"),
        timeout=20,
    )


def pods_left(admin: AdminClient, namespace: str, executor_id: str) -> list[verdict.PodLeft]:
    selector = f"{podmeta.LABEL_EXECUTOR}={podmeta.safe_label_value(executor_id)}"
    reply = admin.request("GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": selector})
    left = []
    for pod in reply.get("items", []):
        meta = pod.get("metadata", {})
        annotations = meta.get("annotations") or {}
        key = podmeta.key_from_annotations(annotations)
        try:
            attempt = int(annotations.get(podmeta.ANNOTATION_LAUNCH_ATTEMPT, "0"))
        except ValueError:
            attempt = 0
        left.append(
            verdict.PodLeft(
                name=meta.get("name", ""),
                key=podmeta.key_string(key) if key is not None else None,
                attempt=attempt,
                done=(meta.get("labels") or {}).get(podmeta.LABEL_DONE) == "true",
                deleting=bool(meta.get("deletionTimestamp")),
                phase=(pod.get("status") or {}).get("phase", ""),
            )
        )
    return left


class Run:
    def __init__(self, options: Options, root: Path) -> None:
        self.options = options
        self.root = root
        self.cluster = Cluster(cluster_settings(root))
        self.disks_ok = disks.available()
        self._transcript: list[str] = []  # what this seed printed, for its report file

    def say(self, text: str) -> None:
        self._transcript.append(text)
        say(text)

    async def seed(self, info: ClusterInfo, seed: int) -> SeedResult:
        options = self.options
        faults = options.faults
        if not self.disks_ok and faults & DISK_FAULTS:
            self.say("note: disk faults skipped: they need root, mount, mkfs.ext4 and chattr")
            faults = faults - DISK_FAULTS
        self._transcript = []
        plan = make_plan(seed, options.tasks, options.duration_s, faults)
        self.say(
            f"== seed {seed} ({time.strftime('%H:%M:%S')}): {options.tasks} tasks over "
            f"{options.duration_s:.0f}s; replay with --seed {seed}"
        )
        for fault in plan.faults:
            self.say(f"   plan: at {fault.at_s:5.1f}s {fault.describe()}")
        if plan.kill_after_batch is not None:
            self.say(
                f"   plan: {plan.kill_after_batch.describe()} after batch {plan.kill_after_batch_number}"
            )
        result = SeedResult(seed, options.tasks)
        workdir = self.root / f"seed-{seed}"
        stores: contextlib.AbstractContextManager[disks.StoreDisks | None] = contextlib.nullcontext()
        if self.disks_ok:
            stores = disks.StoreDisks(
                Path("/dev/shm") / f"{self.root.name}-stores-{seed}", workdir / "stores", STATEFUL
            )
        try:
            with stores as store_disks:
                await self._seed(info, plan, workdir, store_disks, result)
        except (SchedulerError, RuntimeError, ApiError, OSError) as err:
            result.error = f"{type(err).__name__}: {err}"
        report = workdir / "report.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        for line in self._lines(result, limit=_SHOWN_PER_KIND):
            self.say(line)
        report.write_text("\n".join([*self._transcript, "", *self._lines(result, limit=None)]) + "\n")
        if result.clean and not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            self.say(f"   logs, stores and the full report: {workdir}")
        return result

    async def _seed(
        self,
        info: ClusterInfo,
        plan: Plan,
        workdir: Path,
        store_disks: disks.StoreDisks | None,
        result: SeedResult,
    ) -> None:
        options = self.options
        executor_id = f"chaos-{plan.seed}"[:42]
        stack = ServiceStack(
            info,
            workdir,
            executor_id=executor_id,
            flags={
                "watcher": ["--watch-timeout-s", str(options.watch_timeout_s)],
                "reconciler": ["--pending-timeout-s", f"{options.pending_timeout_s:g}"],
            },
        )
        store_paths = {
            name: (store_disks.store_path(name) if store_disks is not None else workdir / f"{name}.db")
            for name in STATEFUL
        }
        services = ServiceSet(stack, store_paths)
        records = {podmeta.key_string(t.key): TaskRecord(t) for t in plan.tasks}
        admin = admin_client(self.cluster)
        services.start_all()
        keeper = asyncio.create_task(services.keep_alive())
        injector: Injector | None = None
        stored: dict[str, task_pb2.Task] = {}
        left: list[verdict.PodLeft] = []
        try:
            for name in SERVICES:
                if not await services.wait_serving(name, 120):
                    raise RuntimeError(f"{name} did not become SERVING:\n{stack.tail(name)}")
            started = time.monotonic()
            services.started = started
            async with Scheduler(
                stack.address("launcher"),
                stack.address("reconciler"),
                stack.credentials("scheduler"),
                records,
                started,
            ) as scheduler:
                follower = asyncio.create_task(scheduler.follow())
                injector = Injector(
                    plan,
                    self.cluster,
                    services,
                    store_disks,
                    admin,
                    info.namespace,
                    records,
                    options.watch_timeout_s,
                    started,
                    self.say,
                )
                progress = asyncio.create_task(self._progress(scheduler))
                try:
                    await self._load_and_faults(plan, scheduler, injector, records)
                    for name in SERVICES:
                        await services.wait_serving(name, 120)
                    self.say(f"[{scheduler.now():6.1f}s] faults over; waiting for every task to finish")
                    if not await scheduler.wait_all_final(options.drain_timeout_s):
                        self.say(
                            f"[{scheduler.now():6.1f}s] {len(scheduler.unfinished())} tasks still unfinished"
                        )
                    stored, left = await self._barrier(
                        plan, scheduler, records, admin, info.namespace, executor_id
                    )
                finally:
                    progress.cancel()
                    follower.cancel()
                    await asyncio.gather(progress, follower, return_exceptions=True)
                result.notes += self._notes(scheduler, services, injector)
        finally:
            if injector is not None:
                injector.release()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            services.stop_all()
        with contextlib.suppress(ApiError, OSError):  # the next seed shares the control plane
            selector = f"{podmeta.LABEL_EXECUTOR}={podmeta.safe_label_value(executor_id)}"
            await asyncio.to_thread(
                admin.request,
                "DELETE",
                f"/api/v1/namespaces/{info.namespace}/pods",
                query={"labelSelector": selector, "gracePeriodSeconds": "0"},
            )
        names = {podmeta.pod_name(r.planned.key, a) for r in records.values() for a in range(1, 7)}
        pods = audit.read(self.cluster.audit_log, names)
        result.tasks = len(plan.tasks)
        result.verdict = verdict.judge(records, stored, pods, left, RELAUNCH_BUDGET)

    async def _load_and_faults(
        self, plan: Plan, scheduler: Scheduler, injector: Injector, records: dict[str, TaskRecord]
    ) -> None:
        by_index = {r.planned.index: r for r in records.values()}
        deadline_s = self.options.duration_s + self.options.drain_timeout_s

        async def batch_at(number: int, at_s: float, indexes: tuple[int, ...]) -> None:
            await asyncio.sleep(max(0.0, at_s - scheduler.now()))
            after_ok = injector.kill_launcher_after_batch if number == plan.kill_after_batch_number else None
            await scheduler.launch([by_index[i] for i in indexes], deadline_s=deadline_s, after_ok=after_ok)

        faults = asyncio.create_task(injector.run())
        launches = [asyncio.create_task(batch_at(b.number, b.at_s, b.tasks)) for b in plan.batches]
        try:
            await asyncio.gather(faults, *launches)  # a fault that fails ends the seed at once
        finally:
            for task in (*launches, faults):
                task.cancel()
            await asyncio.gather(*launches, faults, return_exceptions=True)

    async def _barrier(
        self,
        plan: Plan,
        scheduler: Scheduler,
        records: dict[str, TaskRecord],
        admin: AdminClient,
        namespace: str,
        executor_id: str,
    ) -> tuple[dict[str, task_pb2.Task], list[verdict.PodLeft]]:
        """A sentinel task through the whole pipeline, then the stored tasks, then the pods left
        once the deletes the policy asks for have had their chance."""
        key = task_pb2.TaskKey(
            dag_id="chaos", task_id="sentinel", run_id=plan.run_id, try_number=1, map_index=-1
        )
        sentinel = TaskRecord(PlannedTask(-1, Kind.SUCCESS, key, pod_override(Kind.SUCCESS, 0.5)))
        records[podmeta.key_string(key)] = sentinel
        self.say(f"[{scheduler.now():6.1f}s] barrier: sentinel task launched")
        await scheduler.launch([sentinel], deadline_s=scheduler.now() + 120)
        await scheduler.wait_until(lambda: bool(sentinel.terminal), 120)
        self.say(f"[{scheduler.now():6.1f}s] barrier: sentinel {sentinel.history()}")
        stored = await scheduler.list_tasks()
        deadline = scheduler.now() + 60
        while True:
            left = await asyncio.to_thread(pods_left, admin, namespace, executor_id)
            if not verdict.orphans(left, records, stored) or scheduler.now() > deadline:
                return stored, left
            await asyncio.sleep(1.0)

    async def _progress(self, scheduler: Scheduler) -> None:
        while True:
            await asyncio.sleep(10)
            records = scheduler.records.values()
            acked = sum(r.acked_at_s is not None for r in records)
            final = sum(bool(r.terminal) for r in records)
            self.say(f"[{scheduler.now():6.1f}s] acknowledged {acked}/{len(records)}, finished {final}")

    @staticmethod
    def _notes(scheduler: Scheduler, services: ServiceSet, injector: Injector) -> list[str]:
        notes = []
        records = list(scheduler.records.values())
        if services.crashes:
            notes.append(
                "services exited on their own (and were restarted): "
                + ", ".join(f"{c.service} rc={c.returncode} at {c.at_s:.1f}s" for c in services.crashes)
            )
        not_found = [r for r in records if r.cancel_not_found]
        if not_found:
            notes.append(
                f"CancelTask answered NOT_FOUND after an acknowledged launch for {len(not_found)} tasks "
                f"({sum(r.cancel_not_found for r in not_found)} answers; retried until taken)"
            )
        unanswered = [r.label for r in records if r.cancel_requested and not r.cancel_answered]
        if unanswered:
            notes.append(f"cancels never taken: {', '.join(unanswered[:10])}")
        retried = sum(bool(r.launch_errors) for r in records)
        if retried:
            notes.append(f"launches sent again after an error or no answer: {retried} tasks")
        if scheduler.call_errors:
            notes.append(
                "failed calls (retried): "
                + ", ".join(f"{what} x{n}" for what, n in sorted(scheduler.call_errors.items()))
            )
        anomalies = scheduler.anomalies
        if anomalies.redelivered:
            notes.append(f"WatchTaskStates re-delivered cursors: {'; '.join(anomalies.redelivered[:10])}")
        if anomalies.gaps:
            notes.append(
                "WatchTaskStates skipped cursors: " + ", ".join(f"{a}->{b}" for a, b in anomalies.gaps[:10])
            )
        if anomalies.out_of_range:
            notes.append(f"WatchTaskStates answered OUT_OF_RANGE to a resume {anomalies.out_of_range} times")
        notes.append(
            f"faults injected: {len(injector.injected)} events; stream resumed {anomalies.reconnects} times"
        )
        return notes

    def _lines(self, result: SeedResult, limit: int | None) -> list[str]:
        counts = result.verdict.counts()
        lines = [
            f"seed={result.seed} tasks={result.tasks} "
            + " ".join(f"{v.value}={counts[v]}" for v in verdict.Violation)
            + (f" error={result.error!r}" if result.error else "")
        ]
        lines += [f"   note: {note}" for note in result.notes]
        for violation in verdict.Violation:
            found = [f for f in result.verdict.findings if f.violation is violation]
            for finding in found[:limit]:
                lines.append(f"   {violation.value} {finding.subject}: {finding.detail}")
            if limit is not None and len(found) > limit:
                lines.append(f"   {violation.value}: ... and {len(found) - limit} more (see the report file)")
        return lines

    async def all_seeds(self, seeds: list[int]) -> list[SeedResult]:
        # SIGTERM or Ctrl-C cancels the run, so every finally undoes its fault: paused processes are
        # continued, stores repaired and unmounted, services stopped, the control plane taken down.
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main.cancel)
        info = await asyncio.to_thread(self.cluster.up)
        return [await self.seed(info, seed) for seed in seeds]


def summary(results: list[SeedResult]) -> str:
    totals: dict[verdict.Violation, int] = dict.fromkeys(verdict.Violation, 0)
    for result in results:
        for violation, count in result.verdict.counts().items():
            totals[violation] += count
    line = f"seeds={len(results)} tasks={sum(r.tasks for r in results)} " + " ".join(
        f"{v.value}={totals[v]}" for v in verdict.Violation
    )
    errors = sum(bool(r.error) for r in results)
    return line + (f" errors={errors}" if errors else "")


def execute(options: Options, seeds: list[int]) -> int:
    """Run the seeds on a fresh control plane; 0 when no seed found a violation."""
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="chaos-", dir=options.workdir))
    else:
        root = Path(tempfile.mkdtemp(prefix="shepherd-chaos-"))
    say(f"chaos: seeds {', '.join(map(str, seeds))}; work directory {root}")
    run = Run(options, root)
    results: list[SeedResult] = []
    try:
        results = asyncio.run(run.all_seeds(seeds))
    except asyncio.CancelledError:
        say(f"chaos: interrupted; logs are in {root}")
        return 130
    finally:
        run.cluster.down()
    say(summary(results))
    clean = bool(results) and all(r.clean for r in results)
    if clean and not options.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if clean else 1
