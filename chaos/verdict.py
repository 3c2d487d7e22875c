"""The checks, as pure functions of what was observed: per task, and per pod left at the end.

Rules (each violation names its task and says why):
- lost: the launcher never acknowledged the task, or no terminal transition was delivered for it,
  or the reconciler does not know it at the end.
- duplicate_terminal: more than one terminal transition was delivered for the task.
- wrong_state: the first terminal transition delivered (the one a scheduler acts on) is not what
  the scenario expects, or the reconciler's stored task disagrees with it.
- duplicate_pods, from the audit log: a pod name created (201) more than once; or a pod of a
  later launch attempt created although an earlier attempt's pod ran. Pod names are deterministic
  in (task, attempt), so two creates of one name mean the same attempt made a second pod. A new
  attempt is legitimate only when the previous pod never ran: it was lost before it started. A
  pod "ran" if kwok wrote its status at all and the task is of a kind whose first status write is
  the one that puts it Running (scenarios.RUNS_WHEN_STARTED); image-pull and unschedulable pods
  never run. More attempts than 1 + the relaunch budget is a violation too.
- orphans: a pod of a finished task still there (after the barrier) that the deletion policy says
  must be gone. Under the default policy only the pod of a task that FAILED on its own (the pod
  failed, or a container could not start) is kept, and it must carry the done label; every other
  pod of a finished task, and every pod of an earlier attempt, must be gone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from chaos.audit import PodAudit
from chaos.scenarios import (
    DELETED_WHILE_RUNNING,
    EXPECTED,
    KEPT_FAILURE_REASONS,
    RUNS_WHEN_STARTED,
    Expectation,
)
from chaos.scheduler import TaskRecord
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import task_pb2

S = task_pb2
MAX_ATTEMPTS_LOOKED_AT = 6


class Violation(Enum):
    LOST = "lost"
    DUPLICATE_TERMINAL = "duplicate_terminal"
    DUPLICATE_PODS = "duplicate_pods"
    ORPHANS = "orphans"
    WRONG_STATE = "wrong_state"


@dataclass(frozen=True)
class Finding:
    violation: Violation
    subject: str  # the task id; for orphans, the pod name (they are counted by pod)
    detail: str


@dataclass(frozen=True)
class PodLeft:
    """A pod of this run's executor that still exists."""

    name: str
    key: str | None  # podmeta.key_string, from the pod's annotations
    attempt: int
    done: bool  # carries the done label
    deleting: bool  # has a deletionTimestamp
    phase: str


@dataclass
class Verdict:
    findings: list[Finding] = field(default_factory=list)

    def count(self, violation: Violation) -> int:
        return len({f.subject for f in self.findings if f.violation is violation})

    def counts(self) -> dict[Violation, int]:
        return {v: self.count(v) for v in Violation}

    @property
    def clean(self) -> bool:
        return not self.findings


def expectation(record: TaskRecord) -> Expectation:
    return DELETED_WHILE_RUNNING if record.victim == "running" else EXPECTED[record.kind]


def _name(state: int) -> str:
    return S.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]


def _describe(task: task_pb2.Task) -> str:
    text = _name(task.state)
    if task.failure.reason:
        text += f" ({task.failure.reason}: {task.failure.message})"
    return text


def check_task(
    record: TaskRecord, stored: task_pb2.Task | None, pods: dict[str, PodAudit], relaunch_budget: int
) -> list[Finding]:
    """The per-task rules; `pods` is the audit history by pod name."""
    found: list[Finding] = []

    def add(violation: Violation, detail: str) -> None:
        found.append(Finding(violation, record.label, detail))

    stored_text = _describe(stored) if stored is not None else "unknown to the reconciler"
    terminal = record.terminal
    if record.acked_at_s is None:
        errors = ", ".join(record.launch_errors[-3:]) or "no answer"
        add(
            Violation.LOST,
            f"never acknowledged by the launcher (last errors: {errors}); store: {stored_text}",
        )
    elif not terminal:
        add(Violation.LOST, f"no terminal transition delivered ({record.history()}); store: {stored_text}")
    elif stored is None:
        add(Violation.LOST, f"delivered {record.history()} but the reconciler does not know the task")

    if len(terminal) > 1:
        add(Violation.DUPLICATE_TERMINAL, f"{len(terminal)} terminal transitions: {record.history()}")

    if terminal:
        first = terminal[0]
        expected = expectation(record)
        delivered = S.Task(state=first.state)
        delivered.failure.reason = first.reason
        delivered.failure.container.exit_code = first.exit_code
        if not expected.met_by(delivered):
            why = f" ({first.reason}: {first.message})" if first.reason else ""
            victim = " [its Running pod was deleted during a watch gap]" if record.victim == "running" else ""
            add(
                Violation.WRONG_STATE,
                f"expected {expected.describe()}{victim}, delivered {_name(first.state)}{why}; "
                f"history {record.history()}",
            )
        elif stored is not None and stored.state != first.state:
            add(Violation.WRONG_STATE, f"delivered {_name(first.state)} but the store says {stored_text}")

    found += _pod_findings(record, pods, relaunch_budget)
    return found


def _pod_findings(record: TaskRecord, pods: dict[str, PodAudit], relaunch_budget: int) -> list[Finding]:
    found: list[Finding] = []
    key = record.planned.key
    created: list[tuple[int, str, PodAudit]] = []
    for attempt in range(1, MAX_ATTEMPTS_LOOKED_AT + 1):
        name = podmeta.pod_name(key, attempt)
        audit = pods.get(name)
        if audit is None or not audit.created:
            continue
        created.append((attempt, name, audit))
        if len(audit.created) > 1:
            found.append(
                Finding(
                    Violation.DUPLICATE_PODS,
                    record.label,
                    f"pod {name} (attempt {attempt}) created {len(audit.created)} times, at "
                    + ", ".join(audit.created),
                )
            )
    for (attempt, name, audit), (later, later_name, later_audit) in itertools.pairwise(created):
        if record.kind in RUNS_WHEN_STARTED and audit.ran:
            found.append(
                Finding(
                    Violation.DUPLICATE_PODS,
                    record.label,
                    f"pod {name} (attempt {attempt}) ran (kwok wrote its status at {audit.status_writes[0]}) "
                    f"and pod {later_name} (attempt {later}) was created too, at {later_audit.created[0]}",
                )
            )
    if len(created) > 1 + relaunch_budget:
        found.append(
            Finding(
                Violation.DUPLICATE_PODS,
                record.label,
                f"{len(created)} pods created ({', '.join(n for _, n, _ in created)}); "
                f"the relaunch budget allows {1 + relaunch_budget}",
            )
        )
    return found


def orphans(
    pods_left: list[PodLeft], records: dict[str, TaskRecord], stored: dict[str, task_pb2.Task]
) -> list[Finding]:
    """Pods still there that the deletion policy says must be gone (pods of unfinished tasks are
    not judged here: those tasks are lost already)."""
    found: list[Finding] = []
    for pod in pods_left:
        record = records.get(pod.key) if pod.key is not None else None
        if record is None:
            found.append(
                Finding(Violation.ORPHANS, pod.name, f"pod {pod.name} belongs to no task of this run")
            )
            continue
        task = stored.get(pod.key) if pod.key is not None else None
        if task is None or task.state not in TERMINAL:
            continue
        where = f"pod {pod.name} (attempt {pod.attempt}, {pod.phase or 'no phase'}"
        where += ", being deleted)" if pod.deleting else ")"
        if pod.name != task.pod_name:
            why = f"belongs to a superseded attempt (the task's pod is {task.pod_name})"
        elif task.state == S.TASK_STATE_FAILED and task.failure.reason in KEPT_FAILURE_REASONS:
            if pod.done:
                continue  # kept for debugging, as the policy says, and out of every selector
            why = "is kept for a failed task but not marked done"
        else:
            why = f"is still there though its task ended {_describe(task)}"
        found.append(Finding(Violation.ORPHANS, pod.name, f"{record.label}: {where} {why}"))
    return found


def judge(
    records: dict[str, TaskRecord],
    stored: dict[str, task_pb2.Task],
    pods: dict[str, PodAudit],
    pods_left: list[PodLeft],
    relaunch_budget: int,
) -> Verdict:
    verdict = Verdict()
    for key, record in records.items():
        verdict.findings += check_task(record, stored.get(key), pods, relaunch_budget)
    verdict.findings += orphans(pods_left, records, stored)
    return verdict
