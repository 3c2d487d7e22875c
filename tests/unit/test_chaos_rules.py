"""The chaos suite's own logic: a seed names one plan, and the checks apply their rules exactly
(what counts as a duplicate pod, an orphan, a lost or a wrongly ended task)."""

from __future__ import annotations

from chaos.audit import PodAudit
from chaos.plan import ALL_FAULTS, Fault, PlannedTask, make_plan, parse_faults
from chaos.scenarios import Kind
from chaos.scheduler import Delivered, TaskRecord
from chaos.verdict import PodLeft, Violation, check_task, orphans
from shepherd import podmeta
from shepherd.v1 import task_pb2

S = task_pb2


def test_a_seed_names_one_plan_and_another_seed_another() -> None:
    one = make_plan(7, 200, 60, frozenset(ALL_FAULTS))
    assert one == make_plan(7, 200, 60, frozenset(ALL_FAULTS))
    assert one != make_plan(8, 200, 60, frozenset(ALL_FAULTS))
    assert sorted(b for batch in one.batches for b in batch.tasks) == list(range(200))
    planned = {f.fault for f in one.faults} | {one.kill_after_batch.fault if one.kill_after_batch else None}
    assert planned == set(ALL_FAULTS)
    assert [f.at_s for f in one.faults] == sorted(f.at_s for f in one.faults)
    assert 0 <= one.kill_after_batch_number < len(one.batches)


def test_only_the_chosen_faults_are_planned() -> None:
    plan = make_plan(3, 50, 30, parse_faults("kill-watcher,disk-full"))
    assert {f.fault for f in plan.faults} == {Fault.KILL_WATCHER, Fault.DISK_FULL}
    assert plan.kill_after_batch is None


def record(
    kind: Kind, *states: task_pb2.TaskState.ValueType, reason: str = "", exit_code: int = 0
) -> TaskRecord:
    key = S.TaskKey(dag_id="chaos", task_id=f"{kind.value}-0001", run_id="r", try_number=1, map_index=-1)
    rec = TaskRecord(PlannedTask(1, kind, key, ""), acked_at_s=1.0)
    for cursor, state in enumerate(states, start=1):
        final = state in (S.TASK_STATE_FAILED, S.TASK_STATE_UP_FOR_RESCHEDULE)
        rec.delivered.append(
            Delivered(
                cursor,
                state,
                S.TASK_STATE_UNSPECIFIED,
                reason if final else "",
                "",
                exit_code if final else 0,
                podmeta.pod_name(key),
                1,
                float(cursor),
            )
        )
    return rec


def stored(rec: TaskRecord, attempt: int = 1) -> task_pb2.Task:
    task = S.Task(
        key=rec.planned.key, state=rec.last_state, pod_name=podmeta.pod_name(rec.planned.key, attempt)
    )
    if rec.delivered:
        task.failure.reason = rec.delivered[-1].reason
    return task


def violations(rec: TaskRecord, pods: dict[str, PodAudit] | None = None) -> set[Violation]:
    return {f.violation for f in check_task(rec, stored(rec), pods or {}, relaunch_budget=1)}


def test_one_terminal_transition_of_the_expected_kind_is_clean() -> None:
    ok = record(
        Kind.FAILURE,
        S.TASK_STATE_QUEUED,
        S.TASK_STATE_RUNNING,
        S.TASK_STATE_FAILED,
        reason="PodFailed",
        exit_code=3,
    )
    assert violations(ok) == set()


def test_lost_duplicate_and_wrong_endings_are_each_named() -> None:
    assert violations(record(Kind.SUCCESS, S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING)) == {Violation.LOST}
    doubled = record(Kind.SUCCESS, S.TASK_STATE_QUEUED, S.TASK_STATE_SUCCEEDED, S.TASK_STATE_SUCCEEDED)
    assert violations(doubled) == {Violation.DUPLICATE_TERMINAL}
    wrong = record(Kind.SUCCESS, S.TASK_STATE_QUEUED, S.TASK_STATE_FAILED, reason="PendingTimeout")
    assert violations(wrong) == {Violation.WRONG_STATE}
    wrong_code = record(Kind.FAILURE, S.TASK_STATE_FAILED, reason="PodFailed", exit_code=1)
    assert violations(wrong_code) == {Violation.WRONG_STATE}
    never_acked = record(Kind.SUCCESS)
    never_acked.acked_at_s = None
    assert violations(never_acked) == {Violation.LOST}


def test_a_relaunch_is_legitimate_only_when_the_earlier_pod_never_ran() -> None:
    unschedulable = record(
        Kind.UNSCHEDULABLE, S.TASK_STATE_QUEUED, S.TASK_STATE_FAILED, reason="PendingTimeout"
    )
    key = unschedulable.planned.key
    two_pods = {
        podmeta.pod_name(key, 1): PodAudit(created=["t1"]),
        podmeta.pod_name(key, 2): PodAudit(created=["t2"]),
    }
    assert violations(unschedulable, two_pods) == set()

    success = record(Kind.SUCCESS, S.TASK_STATE_QUEUED, S.TASK_STATE_SUCCEEDED)
    key = success.planned.key
    never_ran = {
        podmeta.pod_name(key, 1): PodAudit(created=["t1"]),
        podmeta.pod_name(key, 2): PodAudit(created=["t2"], status_writes=["t3"]),
    }
    assert violations(success, never_ran) == set()
    ran = {
        podmeta.pod_name(key, 1): PodAudit(created=["t1"], status_writes=["t2"]),
        podmeta.pod_name(key, 2): PodAudit(created=["t3"], status_writes=["t4"]),
    }
    assert violations(success, ran) == {Violation.DUPLICATE_PODS}
    same_name_twice = {podmeta.pod_name(key, 1): PodAudit(created=["t1", "t5"], status_writes=["t2"])}
    assert violations(success, same_name_twice) == {Violation.DUPLICATE_PODS}
    over_budget = {podmeta.pod_name(key, a): PodAudit(created=[f"t{a}"]) for a in (1, 2, 3)}
    assert violations(success, over_budget) == {Violation.DUPLICATE_PODS}


def test_only_a_failed_tasks_own_pod_marked_done_may_stay() -> None:
    failed = record(Kind.FAILURE, S.TASK_STATE_FAILED, reason="PodFailed", exit_code=3)
    succeeded = record(Kind.SUCCESS, S.TASK_STATE_SUCCEEDED)
    records = {podmeta.key_string(r.planned.key): r for r in (failed, succeeded)}
    tasks = {k: stored(r) for k, r in records.items()}
    fkey, skey = podmeta.key_string(failed.planned.key), podmeta.key_string(succeeded.planned.key)

    def pod(key: str, rec: TaskRecord, attempt: int = 1, done: bool = True) -> PodLeft:
        return PodLeft(podmeta.pod_name(rec.planned.key, attempt), key, attempt, done, False, "Failed")

    assert orphans([pod(fkey, failed)], records, tasks) == []
    assert len(orphans([pod(fkey, failed, done=False)], records, tasks)) == 1
    assert len(orphans([pod(fkey, failed, attempt=2)], records, tasks)) == 1  # not the task's pod
    assert len(orphans([pod(skey, succeeded)], records, tasks)) == 1
    stranger = PodLeft("stranger", None, 0, False, False, "Running")
    assert [f.subject for f in orphans([stranger], records, tasks)] == ["stranger"]
