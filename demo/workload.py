"""The demo's task mix, and the client that launches it and follows every state change."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from shepherd import channels, podmeta
from shepherd.taskstates import TERMINAL, state_name
from shepherd.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    reconciler_service_pb2_grpc,
    task_pb2,
)

# kind -> (share of tasks, pod override). The annotations steer the pod's life on kwok nodes.
MIX: dict[str, tuple[float, str]] = {
    "success": (0.70, "metadata: {annotations: {sim.shepherd.dev/run-time: %RUN%}}"),
    "failure": (
        0.10,
        "metadata: {annotations: {sim.shepherd.dev/outcome: fail, sim.shepherd.dev/exit-code: '2', "
        "sim.shepherd.dev/run-time: %RUN%}}",
    ),
    "image-pull-error": (0.08, "metadata: {annotations: {sim.shepherd.dev/outcome: waiting}}"),
    "unschedulable": (0.06, "spec: {containers: [{name: base, resources: {requests: {cpu: '100000'}}}]}"),
    "cancelled": (0.06, "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"),
}


# Tasks that run for real on the local cluster's real node (a kubelet with containerd), when it
# has one: a short script that reports its progress and exits with its own code. Their number is
# fixed, not a share, because real containers start in about a second each on two cores.
REAL_TASKS = 4
REAL_SCRIPT = (
    'for step in 1 2 3; do echo "step $step of 3: working"; sleep 1; done; '
    'echo "done, exiting with code $0"; exit "$0"'
)
EXPECTED = {
    "success": "succeeded",
    "failure": "failed",
    "image-pull-error": "failed",
    "unschedulable": "failed",
    "cancelled": "revoked",
    "real-success": "succeeded",
    "real-failure": "failed",
}


@dataclass
class Tracked:
    kind: str
    key: task_pb2.TaskKey
    launched_at: float = 0.0
    running_at: float | None = None
    final_at: float | None = None
    state: int = task_pb2.TASK_STATE_UNSPECIFIED
    reason: str = ""


@dataclass
class Demo:
    launcher_address: str
    reconciler_address: str
    tasks: int = 300
    credentials: channels.ClientCredentials | None = None
    real_node: bool = False  # the cluster has a real node: some tasks run real containers there
    concurrency: int = 32
    seed: int = 7
    tracked: dict[str, Tracked] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _final_count: int = 0
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def total(self) -> int:
        """Every task the demo launches: the mix, plus the real ones when there is a real node."""
        return self.tasks + (REAL_TASKS if self.real_node else 0)

    def plan(self) -> list[tuple[str, str, task_pb2.TaskKey]]:
        rng = random.Random(self.seed)
        kinds = list(MIX)
        weights = [MIX[k][0] for k in kinds]
        run_id = f"demo__{time.strftime('%Y-%m-%dT%H:%M:%S')}"
        planned = []
        for i in range(self.tasks):
            kind = rng.choices(kinds, weights)[0]
            override = MIX[kind][1].replace("%RUN%", f"{rng.uniform(0.5, 3.0):.1f}s")
            key = task_pb2.TaskKey(
                dag_id="shepherd_demo", task_id=f"{kind}_{i:04d}", run_id=run_id, try_number=1, map_index=-1
            )
            planned.append((kind, override, key))
        if self.real_node:
            for i in range(REAL_TASKS):
                kind = "real-failure" if i == REAL_TASKS - 1 else "real-success"
                key = task_pb2.TaskKey(
                    dag_id="shepherd_demo",
                    task_id=f"{kind}_{i:04d}",
                    run_id=run_id,
                    try_number=1,
                    map_index=-1,
                )
                planned.append((kind, "", key))
        return planned

    async def run(self) -> int:
        async with (
            channels.aio_channel(self.launcher_address, self.credentials) as lch,
            channels.aio_channel(self.reconciler_address, self.credentials) as rch,
        ):
            launcher = launcher_service_pb2_grpc.LauncherServiceStub(lch)
            reconciler = reconciler_service_pb2_grpc.ReconcilerServiceStub(rch)
            # Each demo run has its own reconciler store, so its log starts at cursor 0.
            follower = asyncio.create_task(self._follow(reconciler, 0))
            progress = asyncio.create_task(self._progress())
            await self._launch_all(launcher)
            canceller = asyncio.create_task(self._cancel_when_running(reconciler))
            try:
                await asyncio.wait_for(self._all_final(), timeout=300)
            except TimeoutError:
                print("\n(stopped waiting after 300 s; unfinished tasks are listed below)", file=sys.stderr)
            for task in (follower, progress, canceller):
                task.cancel()
            await asyncio.gather(follower, progress, canceller, return_exceptions=True)
            self._render_progress(final=True)
            unexpected = self.summary()
            await self._print_real_log(reconciler)
        return unexpected

    async def _print_real_log(self, reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub) -> None:
        """The tail of a real task's log, read back through GetTaskLogs (its failed pod is kept)."""
        real = [t for t in self.tracked.values() if t.kind == "real-failure"]
        if not real:
            return
        entry = real[0]
        name = f"{entry.key.dag_id}/{entry.key.task_id}/{entry.key.run_id}"
        print(f"\nLog of a real task ({name}, via GetTaskLogs)")
        try:
            async for chunk in reconciler.GetTaskLogs(
                reconciler_service_pb2.GetTaskLogsRequest(key=entry.key, tail_lines=10), timeout=30
            ):
                for line in chunk.data.decode(errors="replace").splitlines():
                    print(f"  | {line}")
        except grpc.aio.AioRpcError as err:
            print(f"  (not available: {err.code().name}: {err.details()})")

    async def _launch_all(self, launcher: launcher_service_pb2_grpc.LauncherServiceStub) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(kind: str, override: str, key: task_pb2.TaskKey) -> None:
            async with gate:
                entry = Tracked(kind, key, launched_at=time.monotonic())
                self.tracked[podmeta.key_string(key)] = entry
                if kind.startswith("real-"):
                    exit_code = "3" if kind == "real-failure" else "0"
                    request = launcher_service_pb2.LaunchTaskRequest(
                        key=key, command=["sh", "-c", REAL_SCRIPT, exit_code], template_name="real"
                    )
                else:
                    request = launcher_service_pb2.LaunchTaskRequest(
                        key=key, command=["python", "-m", "worker", kind], pod_override_yaml=override
                    )
                await launcher.LaunchTask(request, timeout=30)

        await asyncio.gather(*(one(*item) for item in self.plan()))

    async def _follow(
        self, reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub, after: int
    ) -> None:
        stream = reconciler.WatchTaskStates(reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=after))
        async for response in stream:
            now = time.monotonic()
            for change in response.changes:
                self._record(change.task, now)

    def _record(self, task: task_pb2.Task, now: float) -> None:
        entry = self.tracked.get(podmeta.key_string(task.key))
        if entry is None:
            return
        entry.state = task.state
        if task.state == task_pb2.TASK_STATE_RUNNING and entry.running_at is None:
            entry.running_at = now
        if task.state in TERMINAL and entry.final_at is None:
            entry.final_at = now
            entry.reason = task.failure.reason
            self._final_count += 1
            if self._final_count == self.total:
                self._finished.set()

    async def _cancel_when_running(
        self, reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub
    ) -> None:
        pending = {k for k, t in self.tracked.items() if t.kind == "cancelled"}
        while pending:
            for k in list(pending):
                entry = self.tracked[k]
                if entry.state == task_pb2.TASK_STATE_RUNNING:
                    await reconciler.CancelTask(
                        reconciler_service_pb2.CancelTaskRequest(
                            key=entry.key, reason="demo: cancelled while running"
                        )
                    )
                    pending.discard(k)
            await asyncio.sleep(0.2)

    async def _all_final(self) -> None:
        await self._finished.wait()

    async def _progress(self) -> None:
        while True:
            self._render_progress()
            await asyncio.sleep(0.5 if sys.stdout.isatty() else 3.0)

    def _render_progress(self, final: bool = False) -> None:
        counts = Counter(state_name(t.state) for t in self.tracked.values())
        parts = " ".join(
            f"{name}={counts[name]}"
            for name in ("queued", "running", "succeeded", "failed", "revoked", "up_for_reschedule")
            if counts[name]
        )
        line = f"[{time.monotonic() - self.started:6.1f}s] launched {len(self.tracked)}/{self.total}  {parts}"
        if sys.stdout.isatty():
            print("\r" + line.ljust(110), end="\n" if final else "", flush=True)
        else:
            print(line, flush=True)

    def summary(self) -> int:
        """Print the final summary; return the number of tasks that ended other than expected."""
        expected = EXPECTED
        print("\nFinal states")
        by_state = Counter(state_name(t.state) for t in self.tracked.values())
        for name, count in by_state.most_common():
            print(f"  {name:<18} {count:5d}")
        print("\nBy scenario (expected final state)")
        unexpected = 0
        for kind in EXPECTED:
            group = [t for t in self.tracked.values() if t.kind == kind]
            if not group and kind.startswith("real-"):
                continue
            ok = sum(state_name(t.state) == expected[kind] for t in group)
            unexpected += len(group) - ok
            reasons = Counter(t.reason for t in group if t.reason)
            why = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(2))
            print(f"  {kind:<18} {ok:4d}/{len(group):<4d} {expected[kind]:<10} {why}")
        print("\nLatency (client clock, from the LaunchTask call)")
        for label, attr in (("launch -> running", "running_at"), ("launch -> final", "final_at")):
            values = sorted(
                getattr(t, attr) - t.launched_at
                for t in self.tracked.values()
                if getattr(t, attr) is not None
            )
            if values:
                print(
                    f"  {label:<18} p50 {percentile(values, 50) * 1000:8.0f} ms   "
                    f"p99 {percentile(values, 99) * 1000:8.0f} ms   (n={len(values)})"
                )
        ok = len(self.tracked) - unexpected
        print(f"\n{ok} of {len(self.tracked)} tasks ended as their scenario expects.")
        return unexpected


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]
