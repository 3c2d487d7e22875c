"""Retention's choices (shepherd.retention and each store's hook): which entries are due, which
records go with them (never an unfinished task, never a launch still waiting for its pod), that a
pruned cursor is refused rather than skipped, and that the file stops growing once it applies."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import pytest

from services.launcher.expiry import judge, prune_launches
from services.launcher.store import Launch, LaunchStore, stamp_created, stamp_failed
from services.reconciler.forgotten import LaunchGap, pruned_here
from services.reconciler.store import Batch, PodActionRow, TaskStore, prune_finished
from shepherd import podmeta, retention
from shepherd.eventlog import CursorOutOfRange
from shepherd.retention import Pruner, Retention
from shepherd.sqlite import Database, TableLog
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2, task_pb2
from tests.helpers import task_key

S = task_pb2
DAY = 24 * 3600.0


def _pruner(store: TaskStore, bounds: Retention) -> Pruner:
    return Pruner(
        store.db, store.transitions, "change", bounds, functools.partial(prune_finished, bounds=bounds)
    )


def _task(name: str, state: S.TaskState.ValueType) -> S.Task:
    return S.Task(key=task_key(task_id=name), state=state)


async def _commit(store: TaskStore, *tasks: S.Task) -> None:
    batch = Batch()
    for task in tasks:
        batch.tasks[podmeta.key_string(task.key)] = (task, "")
        change = S.TaskStateChange()
        change.task.CopyFrom(task)
        batch.changes.append(change)
    await store.commit(batch)


def _stored(store: TaskStore) -> dict[str, int]:
    """The stored tasks' states, by task_id."""
    rows = store.db.reader.execute("SELECT task, state FROM tasks").fetchall()
    return {S.Task.FromString(blob).key.task_id: int(state) for blob, state in rows}


async def test_pruning_removes_only_tasks_whose_terminal_transition_went(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    # Every state, and one task that ended after its first transitions.
    await _commit(store, *(_task(f"s{state}", state) for state in S.TaskState.values() if state))
    await _commit(store, _task("later", S.TASK_STATE_QUEUED))
    await _commit(store, _task("later", S.TASK_STATE_RUNNING))
    cut = store.transitions.head()
    await _commit(store, _task("later", S.TASK_STATE_SUCCEEDED))
    # Prune by count, up to `cut`: "later"'s end is still in the log.
    pruner = _pruner(store, Retention(DAY, store.transitions.head() - cut))
    await pruner.tick()
    assert store.transitions.oldest() == cut
    kept = _stored(store)
    non_terminal = {f"s{state}" for state in S.TaskState.values() if state and state not in TERMINAL}
    assert set(kept) == non_terminal | {"later"}
    assert kept["later"] == S.TASK_STATE_SUCCEEDED  # its end is still in the log
    await store.close()


async def test_a_pruned_cursor_is_refused_and_cursor_zero_starts_at_the_oldest_left(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    for i in range(10):
        await _commit(store, _task(f"t{i}", S.TASK_STATE_SUCCEEDED))
    pruner = _pruner(store, Retention(DAY, max_entries=4, batch=3))
    assert await pruner.tick() == 6
    log = store.transitions
    assert log.oldest() == 6
    assert [cursor for cursor, _ in log.read_after(0, 100)] == [7, 8, 9, 10]
    assert [cursor for cursor, _ in log.read_after(6, 100)] == [7, 8, 9, 10]
    with pytest.raises(CursorOutOfRange, match="oldest cursor still available is 6") as caught:
        log.read_after(5, 100)
    assert caught.value.oldest == 6
    await store.close()
    # Reopened with every entry pruned: cursors go on from where they were, never reused.
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    pruner = _pruner(store, Retention(100.0))
    await pruner.tick(now=1000.0)
    await pruner.tick(now=2000.0)
    assert store.transitions.read_after(0, 10) == []
    await store.close()
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    assert store.transitions.head() == 10
    await _commit(store, _task("next", S.TASK_STATE_QUEUED))
    assert [cursor for cursor, _ in store.transitions.read_after(0, 10)] == [11]
    await store.close()


async def test_entries_older_than_the_period_are_due_and_younger_ones_are_not(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    pruner = _pruner(store, Retention(100.0))
    await _commit(store, _task("old", S.TASK_STATE_SUCCEEDED))
    await pruner.tick(now=1000.0)  # marks: at t=1000 the head was 1
    await _commit(store, _task("young", S.TASK_STATE_SUCCEEDED))
    await pruner.tick(now=1050.0)  # at t=1050 the head was 2
    assert store.transitions.oldest() == 0  # nothing is 100 s old yet
    await pruner.tick(now=1100.0)
    assert store.transitions.oldest() == 1  # "old" is, "young" is not
    assert set(_stored(store)) == {"young"}
    await pruner.tick(now=1150.0)
    assert _stored(store) == {}
    marks = store.db.reader.execute("SELECT COUNT(*) FROM retention_marks").fetchone()[0]
    assert marks <= 3  # the marks are pruned too
    await store.close()


def _launch(name: str) -> tuple[Launch, dict[str, object]]:
    key = task_key(task_id=name)
    pod: dict[str, object] = {"metadata": {"name": podmeta.pod_name(key), "annotations": {}}}
    return Launch(key=key, pod_name=podmeta.pod_name(key), attempt=1), pod


async def test_launches_go_with_their_last_event_but_never_while_waiting_for_a_pod(tmp_path: Path) -> None:
    store = LaunchStore(tmp_path / "l.db", synchronous="OFF")
    accepted = await store.accept([_launch(n) for n in ("waiting", "failed", "created", "relaunched")])
    by_name = {a.launch.key.task_id: a.launch for a in accepted}
    await store.update(stamp_failed(by_name["failed"], S.FailureDetails(reason="CreateFailed")))
    await store.update(stamp_created(by_name["created"]))
    await store.update(stamp_created(by_name["relaunched"]))
    await store.relaunch(by_name["relaunched"].key, 1)  # a later event: the CREATED one is not the last
    events = store.db.reader.execute("SELECT cursor, launch FROM launch_events").fetchall()

    def prune(conn: sqlite3.Connection) -> int:
        conn.execute("DELETE FROM launch_events")
        return prune_launches(conn, [(c, bytes(b)) for c, b in events], 123.0)

    assert await store.db.write(prune) == 1
    left = {
        Launch.FromString(b).key.task_id for (b,) in store.db.reader.execute("SELECT launch FROM launches")
    }
    assert left == {"waiting", "created", "relaunched"}
    queued = store.db.reader.execute("SELECT key, due FROM launch_expiry").fetchall()
    assert queued == [(podmeta.key_string(by_name["created"].key), 123.0)]
    await store.close()


def test_a_created_launch_is_forgotten_only_once_its_task_ended_a_period_ago() -> None:
    now = 10 * DAY
    created = now - 3 * DAY
    running = S.Task(state=S.TASK_STATE_RUNNING)
    assert judge(running, now=now, period_s=DAY, created=created) == (False, now + DAY)
    ended = S.Task(state=S.TASK_STATE_SUCCEEDED)
    ended.end_time.FromSeconds(int(now - DAY / 2))
    assert judge(ended, now=now, period_s=DAY, created=created) == (False, now + DAY / 2)
    ended.end_time.FromSeconds(int(now - DAY))
    assert judge(ended, now=now, period_s=DAY, created=created) == (True, now)
    # The reconciler pruned it: by age long ago, but by count perhaps just now, so the launch stays
    # until its pod was created a period ago.
    assert judge(None, now=now, period_s=DAY, created=created) == (True, created + DAY)
    assert judge(None, now=now, period_s=DAY, created=now - DAY / 4) == (False, now + 3 * DAY / 4)


async def test_the_file_stops_growing_once_retention_applies(tmp_path: Path) -> None:
    """SQLite reuses the pages deletes free: rounds of writes, each followed by pruning to a
    fixed count, leave the file the size it had after the first rounds."""
    schema = "CREATE TABLE IF NOT EXISTS log (cursor INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);"
    db = Database(tmp_path / "size.db", schema + retention.SCHEMA, synchronous="OFF")
    log: TableLog[bytes] = TableLog(db, "log", "body", lambda _, blob: blob, "entry")
    pruner = Pruner(db, log, "body", Retention(DAY, max_entries=2000, batch=500), lambda _c, _r: 0)
    sizes = []
    for _ in range(8):

        def write(conn: sqlite3.Connection) -> None:
            for _ in range(2000):
                log.append(conn, bytes(1600), bytes(1600))

        await db.write(write)
        await pruner.tick()
        files = [tmp_path / "size.db", tmp_path / "size.db-wal"]
        sizes.append(sum(f.stat().st_size for f in files if f.exists()))
    assert sizes[-1] <= sizes[1], sizes
    await db.close()


def test_the_reconciler_does_not_learn_again_a_launch_whose_task_it_pruned() -> None:
    now = 10 * DAY
    launch = Launch(state=launcher_service_pb2.LAUNCH_STATE_CREATED)
    launch.accept_time.FromSeconds(int(now - 60))
    gap = LaunchGap(after=100, upto=200)

    def pruned(cursor: int, committed: int = 300, retention_s: float = DAY) -> bool:
        return pruned_here(launch, cursor, committed=committed, gap=gap, now=now, retention_s=retention_s)

    # Its last event was applied here, yet no task is stored: pruned (by count, a minute after).
    assert pruned(50)
    assert pruned(300)
    assert not pruned(301)  # not applied yet: the stream is still bringing it
    assert not pruned(150)  # skipped unread in a gap: never seen here
    launch.state = launcher_service_pb2.LAUNCH_STATE_ACCEPTED  # cancelled here, not yet there
    assert pruned(50)
    # No cursor (an older launcher): only age tells, and a launch still waiting is learnt.
    launch.accept_time.FromSeconds(int(now - DAY - 1))
    assert not pruned(0)
    launch.state = launcher_service_pb2.LAUNCH_STATE_CREATED
    assert pruned(0)
    assert not pruned(0, retention_s=2 * DAY)


async def test_a_pruned_task_takes_its_kept_log_tail_with_it(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    old, new = _task("old", S.TASK_STATE_SUCCEEDED), _task("new", S.TASK_STATE_SUCCEEDED)
    await _commit(store, old)
    cut = store.transitions.head()
    await _commit(store, new)
    for task in (old, new):
        await store.keep_log(podmeta.key_string(task.key), "uid", b"tail\n", max_kept=10)
    pruner = _pruner(store, Retention(DAY, store.transitions.head() - cut))
    await pruner.tick()
    assert set(_stored(store)) == {"new"}
    assert store.kept_log(podmeta.key_string(old.key)) is None
    assert store.kept_log(podmeta.key_string(new.key)) == ("uid", b"tail\n")
    await store.close()


async def test_pruning_a_relaunched_task_takes_the_actions_on_each_of_its_pods(tmp_path: Path) -> None:
    """A task relaunched after its first pod was lost has an action for each attempt's pod; the
    first pod's is not the task's current pod, and was left behind for ever when the task went."""
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    task = _task("relaunched", S.TASK_STATE_SUCCEEDED)
    task.namespace, task.launch_attempts = "ns", 2
    key = podmeta.key_string(task.key)
    batch = Batch()
    batch.tasks[key] = (task, "uid-2")
    change = S.TaskStateChange()
    change.task.CopyFrom(task)
    batch.changes.append(change)
    for attempt in (1, 2):
        batch.actions.append(
            PodActionRow(
                f"uid-{attempt}", "ns", podmeta.pod_name(task.key, attempt), "delete", key, read_events=True
            )
        )
    await store.commit(batch)
    await store.finish_actions(["uid-1", "uid-2"])
    await _commit(store, _task("after", S.TASK_STATE_SUCCEEDED))
    await _pruner(store, Retention(DAY, max_entries=1)).tick()
    assert set(_stored(store)) == {"after"}
    left = store.db.reader.execute(
        "SELECT pod_uid FROM pod_actions UNION ALL SELECT pod_uid FROM post_mortems"
    )
    assert left.fetchall() == []
    await store.close()
