"""One seed's plan: the tasks, the batches they are launched in and when, and the faults.

Everything random is drawn here, up front, from one `random.Random(seed)`, so a seed names the
same tasks, batches, fault order and fault parameters on every run. Only wall-clock timing can
differ between replays (the machine is shared).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from chaos.scenarios import WEIGHTS, Kind, pod_override
from shepherd.v1 import task_pb2

MAX_BATCH = 12


class Fault(Enum):
    KILL_WATCHER = "kill-watcher"
    KILL_RECONCILER = "kill-reconciler"
    KILL_LAUNCHER = "kill-launcher"
    # Armed on one batch: the launcher is killed the instant it answers that batch OK.
    KILL_LAUNCHER_AFTER_BATCH = "kill-launcher-after-batch"
    STOP_APISERVER = "stop-apiserver"  # SIGSTOP for hold_s, then SIGCONT
    RESTART_APISERVER = "restart-apiserver"
    # The watcher is paused past its watch timeout, pods are deleted, etcd is compacted: 410 Gone.
    COMPACT_ETCD = "compact-etcd"
    SQLITE_COMMIT = "sqlite-commit"  # the target restarts with its next `count` commits failing
    DISK_FULL = "disk-full"  # the target's store fills up for hold_s
    DISK_READ_ONLY = "disk-read-only"  # the target's store refuses writes for hold_s


ALL_FAULTS = tuple(Fault)
STATEFUL = ("launcher", "reconciler")
# Faults that need root (loop-mounted file systems and file attributes).
DISK_FAULTS = frozenset({Fault.DISK_FULL, Fault.DISK_READ_ONLY})
_KILL_TARGET = {
    Fault.KILL_WATCHER: "watcher",
    Fault.KILL_RECONCILER: "reconciler",
    Fault.KILL_LAUNCHER: "launcher",
    Fault.KILL_LAUNCHER_AFTER_BATCH: "launcher",
}


@dataclass(frozen=True)
class PlannedTask:
    index: int
    kind: Kind
    key: task_pb2.TaskKey
    override: str


@dataclass(frozen=True)
class PlannedBatch:
    number: int
    at_s: float  # seconds after the start of the run
    tasks: tuple[int, ...]  # indexes into Plan.tasks


@dataclass(frozen=True)
class PlannedFault:
    at_s: float  # not before this many seconds after the start (faults run one at a time)
    fault: Fault
    target: str = ""  # the service it hits, where it hits one
    restart_after_s: float = 0.0  # killed services come back after this long
    hold_s: float = 0.0  # how long a pause, a full or a read-only store lasts
    count: int = 0  # failing commits (SQLITE_COMMIT), pods deleted in the gap (COMPACT_ETCD)

    def describe(self) -> str:
        parts = [self.fault.value]
        if self.target:
            parts.append(f"target={self.target}")
        if self.restart_after_s:
            parts.append(f"restart_after={self.restart_after_s:.1f}s")
        if self.hold_s:
            parts.append(f"hold={self.hold_s:.1f}s")
        if self.count:
            parts.append(f"count={self.count}")
        return " ".join(parts)


@dataclass(frozen=True)
class Plan:
    seed: int
    run_id: str
    tasks: tuple[PlannedTask, ...]
    batches: tuple[PlannedBatch, ...]
    faults: tuple[PlannedFault, ...]  # in the order they run
    kill_after_batch: PlannedFault | None  # carried out by the launching side, after `batch`
    kill_after_batch_number: int = -1


def make_plan(seed: int, tasks: int, duration_s: float, faults: frozenset[Fault]) -> Plan:
    rng = random.Random(seed)
    run_id = f"chaos-{seed}"
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    planned = []
    for i in range(tasks):
        kind = rng.choices(kinds, weights)[0]
        run_time = rng.uniform(20.0, 40.0) if kind is Kind.LONG_SUCCESS else rng.uniform(0.5, 3.0)
        key = task_pb2.TaskKey(
            dag_id="chaos", task_id=f"{kind.value}-{i:04d}", run_id=run_id, try_number=1, map_index=-1
        )
        planned.append(PlannedTask(i, kind, key, pod_override(kind, run_time)))

    batches: list[PlannedBatch] = []
    start = 0
    while start < tasks:
        size = rng.randint(1, MAX_BATCH)
        indexes = tuple(range(start, min(tasks, start + size)))
        # Spread evenly by task count over the launch window, so the rate is steady.
        batches.append(PlannedBatch(len(batches), duration_s * start / tasks, indexes))
        start += size

    chosen = [f for f in ALL_FAULTS if f in faults]
    rng.shuffle(chosen)
    window = duration_s * 0.85  # faults start inside the launch window, some run past its end
    starts = sorted(rng.uniform(duration_s * 0.05, window) for _ in chosen)
    schedule: list[PlannedFault] = []
    after_batch: PlannedFault | None = None
    after_batch_number = -1
    for at_s, fault in zip(starts, chosen, strict=True):
        planned_fault = _parameters(rng, at_s, fault)
        if fault is Fault.KILL_LAUNCHER_AFTER_BATCH:
            after_batch = planned_fault
            after_batch_number = next(
                (b.number for b in batches if b.at_s >= at_s), batches[-1].number if batches else -1
            )
        else:
            schedule.append(planned_fault)
    return Plan(
        seed, run_id, tuple(planned), tuple(batches), tuple(schedule), after_batch, after_batch_number
    )


def _parameters(rng: random.Random, at_s: float, fault: Fault) -> PlannedFault:
    if fault in _KILL_TARGET:
        return PlannedFault(at_s, fault, _KILL_TARGET[fault], restart_after_s=rng.uniform(1.0, 3.0))
    if fault is Fault.STOP_APISERVER:
        return PlannedFault(at_s, fault, "kube-apiserver", hold_s=rng.uniform(5.0, 15.0))
    if fault is Fault.RESTART_APISERVER:
        return PlannedFault(at_s, fault, "kube-apiserver")
    if fault is Fault.COMPACT_ETCD:
        return PlannedFault(at_s, fault, "watcher", count=rng.randint(1, 3))
    if fault is Fault.SQLITE_COMMIT:
        return PlannedFault(
            at_s, fault, rng.choice(STATEFUL), restart_after_s=rng.uniform(1.0, 3.0), count=rng.randint(1, 3)
        )
    return PlannedFault(at_s, fault, rng.choice(STATEFUL), hold_s=rng.uniform(3.0, 8.0))


def parse_faults(text: str) -> frozenset[Fault]:
    """'all', or a comma-separated list of fault names; ValueError names an unknown one."""
    if text.strip() in ("", "all"):
        return frozenset(ALL_FAULTS)
    chosen = set()
    for name in (part.strip() for part in text.split(",") if part.strip()):
        try:
            chosen.add(Fault(name))
        except ValueError:
            raise ValueError(
                f"unknown fault {name!r}; choose from: {', '.join(f.value for f in ALL_FAULTS)}"
            ) from None
    return frozenset(chosen)
