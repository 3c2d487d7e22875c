"""The Airflow comparison's figures, computed from what each run leaves behind: the task instances'
timestamps (Airflow's metadata database, through its REST API), the API server's audit log, and
CPU time sampled from /proc.

Everything here is pure except `ProcessTreeMeter._scan`, which reads /proc: the scenario
(bench/airflow.py) collects, these functions judge, and tests/unit/test_bench_airflow.py checks
them table by table.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import percentile

SUCCESS = "success"


def parse_time(text: str | None) -> datetime | None:
    """An Airflow REST API timestamp (ISO 8601, `Z` or an offset), or None."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class TaskTimes:
    """One task instance of the run: its final state and the three instants the figures use."""

    name: str  # task_id, with [map_index] for a mapped instance
    state: str
    queued: datetime | None  # queued_when (queued_dttm): the scheduler handed it to the executor
    started: datetime | None  # start_date: the task's process in the pod began running it
    ended: datetime | None

    @classmethod
    def from_api(cls, ti: Mapping[str, Any]) -> TaskTimes:
        """From one item of `GET /api/v2/dags/{dag}/dagRuns/{run}/taskInstances`."""
        index = ti.get("map_index", -1)
        name = str(ti["task_id"]) + (f"[{index}]" if index is not None and index >= 0 else "")
        return cls(
            name=name,
            state=str(ti.get("state") or "none"),
            queued=parse_time(ti.get("queued_when")),
            started=parse_time(ti.get("start_date")),
            ended=parse_time(ti.get("end_date")),
        )


@dataclass(frozen=True)
class RunTimes:
    """A DAG run as the metadata database has it once every task instance is done."""

    state: str
    started: datetime  # the DAG run's start_date: the scheduler set it running
    ended: datetime | None
    tasks: tuple[TaskTimes, ...]


def run_figures(run: RunTimes) -> dict[str, Any]:
    """Time from the DAG run's start to its last task's end, queued -> running latency, states."""
    ends = [t.ended for t in run.tasks if t.ended is not None]
    latencies = [
        (t.started - t.queued).total_seconds()
        for t in run.tasks
        if t.queued is not None and t.started is not None
    ]
    states = Counter(t.state for t in run.tasks)
    return {
        "tasks": len(run.tasks),
        "states": dict(sorted(states.items())),
        "all_succeeded": states[SUCCESS] == len(run.tasks) and run.state == SUCCESS,
        "run_state": run.state,
        # What a user waits for: from the run starting to the last task being done.
        "seconds_to_all_done": round((max(ends) - run.started).total_seconds(), 2) if ends else None,
        # Until the scheduler also marked the run done (one more scheduler loop at most).
        "seconds_to_run_done": round((run.ended - run.started).total_seconds(), 2) if run.ended else None,
        "queued_to_running_n": len(latencies),
        "queued_to_running_p50_s": round(percentile(latencies, 50), 2) if latencies else None,
        "queued_to_running_p99_s": round(percentile(latencies, 99), 2) if latencies else None,
        "queued_to_running_max_s": round(max(latencies), 2) if latencies else None,
    }


@dataclass
class PodCalls:
    """Pod creates and deletes of one run, from the API server's audit log, by any client."""

    created: set[str] = field(default_factory=set)
    # pod -> user -> delete calls (every answered delete, whatever its status)
    deletes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    delete_codes: Counter[int] = field(default_factory=Counter)

    def figures(self) -> dict[str, Any]:
        pods = len(self.created)
        by_user: Counter[str] = Counter()
        for name in self.created:
            by_user.update(self.deletes.get(name, Counter()))
        total = sum(by_user.values())
        per_pod = [sum(self.deletes.get(name, Counter()).values()) for name in self.created]
        return {
            "pods_created": pods,
            "delete_calls": total,
            "delete_calls_per_pod": round(total / pods, 2) if pods else None,
            "delete_calls_per_pod_max": max(per_pod) if per_pod else None,
            "pods_never_deleted": sum(1 for n in per_pod if n == 0),
            "delete_calls_by_client": dict(by_user.most_common()),
            "delete_status_codes": {str(code): n for code, n in sorted(self.delete_codes.items())},
        }


def pod_calls(
    entries: Iterable[Mapping[str, Any]],
    namespace: str,
    prefix: str,
    names: Collection[str] | None = None,
) -> PodCalls:
    """Creates (answered 201) and deletes of pods in `namespace` whose names start with `prefix`
    (the DAG's id as both executors put it first in the pod's name) and, if given, are in `names`
    (in a namespace other runs share, the pod names of this run's tasks), from audit log entries."""
    calls = PodCalls()
    for entry in entries:
        ref = entry.get("objectRef") or {}
        name = str(ref.get("name") or "")
        if (
            entry.get("stage") != "ResponseComplete"
            or ref.get("resource") != "pods"
            or ref.get("subresource")
            or ref.get("namespace") != namespace
            or not name.startswith(prefix)
            or (names is not None and name not in names)
        ):
            continue
        code = int((entry.get("responseStatus") or {}).get("code") or 0)
        user = str((entry.get("user") or {}).get("username") or "?")
        if entry.get("verb") == "create" and code == 201:
            calls.created.add(name)
        elif entry.get("verb") == "delete":
            calls.deletes[name][user] += 1
            calls.delete_codes[code] += 1
    return calls


def pod_name_prefix(dag_id: str) -> str:
    """The start both executors give a pod of `dag_id`: lower case, `_` and `.` as `-`."""
    return "".join(c if c.isalnum() else "-" for c in dag_id.lower()) + "-"


# ---- CPU of a process tree --------------------------------------------------------------------

ProcessId = tuple[int, int]  # (pid, start time in clock ticks): a pid reused later is another process


@dataclass
class CpuLedger:
    """CPU seconds a process tree used since `start`, from repeated samples of its live members.

    A member's own user + system time only (never its children's cumulative times, which would
    count a reaped child twice). A process that appears after the start counts from zero; one that
    exits between two samples loses what it used since the last sample it was seen in, so sample
    often (a second) for a tree whose members come and go."""

    baseline: dict[ProcessId, float] = field(default_factory=dict)
    latest: dict[ProcessId, float] = field(default_factory=dict)
    names: dict[ProcessId, str] = field(default_factory=dict)

    def start(self, sample: Mapping[ProcessId, tuple[str, float]]) -> None:
        self.baseline = {pid: cpu for pid, (_, cpu) in sample.items()}
        self.latest = dict(self.baseline)
        self.names = {pid: name for pid, (name, _) in sample.items()}

    def observe(self, sample: Mapping[ProcessId, tuple[str, float]]) -> None:
        for pid, (name, cpu) in sample.items():
            self.latest[pid] = max(cpu, self.latest.get(pid, 0.0))
            self.names.setdefault(pid, name)

    def used(self) -> float:
        return round(sum(cpu - self.baseline.get(pid, 0.0) for pid, cpu in self.latest.items()), 2)

    def used_by_name(self) -> dict[str, float]:
        """The same seconds, per process name (several processes may share one)."""
        totals: dict[str, float] = defaultdict(float)
        for pid, cpu in self.latest.items():
            totals[self.names.get(pid, "?")] += cpu - self.baseline.get(pid, 0.0)
        ranked = sorted(totals.items(), key=lambda item: -item[1])
        return {name: round(value, 2) for name, value in ranked if round(value, 2) > 0}


def descendants(parents: Mapping[int, int], root: int) -> set[int]:
    """`root` and every process below it, from a pid -> parent pid map."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found & set(parents)


@dataclass
class ProcessTreeMeter:
    """CPU seconds of the trees below some root pids (a scheduler and the processes it starts)."""

    roots: dict[str, int]
    ledgers: dict[str, CpuLedger] = field(default_factory=dict)

    def start(self) -> None:
        samples = self._scan()
        self.ledgers = {}
        for label in self.roots:
            ledger = CpuLedger()
            ledger.start(samples.get(label, {}))
            self.ledgers[label] = ledger

    def sample(self) -> None:
        for label, sample in self._scan().items():
            self.ledgers[label].observe(sample)

    def used(self) -> dict[str, float]:
        return {label: ledger.used() for label, ledger in self.ledgers.items()}

    def _scan(self) -> dict[str, dict[ProcessId, tuple[str, float]]]:
        stats: dict[int, tuple[int, str, float, int]] = {}  # pid -> parent, name, cpu, start
        tick = os.sysconf("SC_CLK_TCK")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            head, _, rest = raw.rpartition(")")
            name = head.split("(", 1)[1]
            fields = rest.split()
            # fields[0] is the state (stat's third field): ppid is [1], utime [11], stime [12],
            # starttime [19].
            stats[int(entry.name)] = (
                int(fields[1]),
                name,
                (int(fields[11]) + int(fields[12])) / tick,
                int(fields[19]),
            )
        parents = {pid: s[0] for pid, s in stats.items()}
        out: dict[str, dict[ProcessId, tuple[str, float]]] = {}
        for label, root in self.roots.items():
            out[label] = {
                (pid, stats[pid][3]): (stats[pid][1], stats[pid][2])
                for pid in descendants(parents, root)
                if pid in stats
            }
        return out


# ---- the side-by-side table -------------------------------------------------------------------

# (label, key in a phase's figures, unit); smaller is better for every one of them.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("DAG run start -> all tasks done", "seconds_to_all_done", "s"),
    ("queued -> running p50", "queued_to_running_p50_s", "s"),
    ("queued -> running p99", "queued_to_running_p99_s", "s"),
    ("pod delete calls per pod", "delete_calls_per_pod", ""),
    ("scheduler CPU (process tree)", "scheduler_cpu_s", "s"),
    ("+ Shepherd's services' CPU", "services_cpu_s", "s"),
    ("scheduler + services CPU", "scheduler_side_cpu_s", "s"),
)


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or baseline == 0:
        return ""
    return f"x{value / baseline:.2f}"


def side_by_side(phases: Mapping[str, Mapping[str, Any]], baseline: str) -> list[str]:
    """The figures of every phase in one table, each with its ratio to the baseline phase's."""
    names = list(phases)
    width = max(len(label) for label, _, _ in ROWS) + 2
    col = max(24, *(len(n) + 2 for n in names))
    lines = ["".ljust(width) + "".join(n.ljust(col) for n in names)]
    for label, key, unit in ROWS:
        base = phases[baseline].get(key)
        cells = []
        for name in names:
            value = phases[name].get(key)
            if value is None:
                cells.append("-".ljust(col))
                continue
            shown = f"{value:g}{' ' + unit if unit else ''}"
            if name != baseline:
                shown += f" ({ratio(value, base)})" if ratio(value, base) else ""
            cells.append(shown.ljust(col))
        lines.append(label.ljust(width) + "".join(cells))
    return [line.rstrip() for line in lines]
