"""The reconciler's durable state: tasks, the transition log, stream cursors and pod actions.

Everything one batch of events changes is committed in one transaction: the new task rows, the
transitions appended to the log, the pod actions to carry out, and the launcher stream's cursor
(the watcher stream re-syncs from a snapshot instead). So after a crash the reconciler resumes
exactly where its last commit ended:
no transition is applied twice, none is lost, and a transition is on disk before any subscriber
can read it. Batches commit in order or not at all: one whose predecessor failed to commit is
refused (see TaskStore.commit), so a failed commit is never papered over by a later one.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.trace import Span

from shepherd import podmeta, retention
from shepherd.retention import Retention
from shepherd.sqlite import Database, StoreUnavailable, Synchronous, TableLog
from shepherd.taskstates import TERMINAL
from shepherd.v1 import task_pb2

_BATCHES = "batch"  # the cursors row numbering the engine batches committed so far

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    key TEXT PRIMARY KEY,          -- podmeta.key_string(TaskKey)
    dag_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    task BLOB NOT NULL,            -- serialized shepherd.v1.Task
    pod_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, key);
CREATE INDEX IF NOT EXISTS tasks_by_dag ON tasks(dag_id, key);
CREATE TABLE IF NOT EXISTS transitions (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    change BLOB NOT NULL           -- serialized shepherd.v1.TaskStateChange (its cursor field unset)
);
CREATE TABLE IF NOT EXISTS cursors (
    source TEXT PRIMARY KEY,       -- "launcher", "watcher", or "batch" (engine batches committed)
    cursor INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pod_actions (
    pod_uid TEXT PRIMARY KEY,      -- one action per pod, ever: no pod is deleted twice
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    action TEXT NOT NULL,          -- "delete" or "mark-done"
    done INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pod_actions_pending ON pod_actions(done);
-- Pruning a task finds the actions on each of its attempts' pods by name (pod names are made
-- from the key and the attempt): a relaunched task's earlier pods are not its current pod_uid.
CREATE INDEX IF NOT EXISTS pod_actions_by_name ON pod_actions(name, namespace);
CREATE TABLE IF NOT EXISTS post_mortems (
    pod_uid TEXT PRIMARY KEY,      -- what to read of the pod before (log) and after (events) its action
    task_key TEXT NOT NULL,
    keep_log INTEGER NOT NULL,
    read_events INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pruned_tasks (
    key TEXT PRIMARY KEY,          -- a task pruning deleted: a late event of it must not bring it back
    task BLOB NOT NULL,            -- serialized shepherd.v1.Task: its key, final state, queued_time
    pruned_at REAL NOT NULL        -- epoch seconds; kept a retention period (and count) after that
);
CREATE INDEX IF NOT EXISTS pruned_tasks_by_age ON pruned_tasks(pruned_at);
CREATE TABLE IF NOT EXISTS kept_logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- newest last: the oldest beyond the bound are dropped
    task_key TEXT NOT NULL UNIQUE,
    pod_uid TEXT NOT NULL,
    tail BLOB NOT NULL             -- the end of the pod's `base` log, bounded (postmortem.TailBuffer)
);
"""


@dataclass(frozen=True)
class Tombstone:
    """What is left of a pruned task (prune_finished): its key, the state it ended in and when its
    launch was accepted (`task`, nothing else of it), and when it went."""

    task: task_pb2.Task
    pruned_at: float  # epoch seconds


@dataclass(frozen=True)
class PodActionRow:
    pod_uid: str
    namespace: str
    name: str
    action: str
    # What the clean-up reads of the pod (postmortem.py); stored beside the action, in its
    # transaction, so a restart that carries out the action again reads it again too.
    task_key: str = ""
    keep_log: bool = False  # keep the tail of `base`'s log before the action
    read_events: bool = False  # read the pod's Events into the failure details after it
    # The trace context of the pod's launch when it is traced (shepherd/tracing.py); not stored:
    # an action taken up again after a restart is carried out untraced.
    traceparent: str = field(default="", compare=False)


@dataclass
class Batch:
    """What one batch of events changes; written in one transaction."""

    tasks: dict[str, tuple[task_pb2.Task, str]] = field(default_factory=dict)  # key -> (task, pod uid)
    changes: list[task_pb2.TaskStateChange] = field(default_factory=list)
    actions: list[PodActionRow] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)
    relaunches: list[tuple[task_pb2.TaskKey, int]] = field(default_factory=list)  # (key, lost attempt)
    spans: list[Span] = field(default_factory=list)  # the transitions' (tracing); ended once committed

    def __bool__(self) -> bool:
        return bool(self.tasks or self.changes or self.actions or self.cursors)


@dataclass(frozen=True)
class Committed:
    changes: list[task_pb2.TaskStateChange]
    new_actions: list[PodActionRow]


class TaskStore:
    def __init__(self, path: Path | str, *, synchronous: Synchronous = "FULL") -> None:
        self.db = Database(path, SCHEMA + retention.SCHEMA, synchronous=synchronous)
        self.transitions: TableLog[task_pb2.TaskStateChange] = TableLog(
            self.db, "transitions", "change", _decode_change, "transition"
        )
        self._batches = self.cursor(_BATCHES)  # batches handed to commit() (at open: committed)

    async def close(self) -> None:
        await self.db.close()

    # ---- reads ---------------------------------------------------------------------------------

    def get(self, key: str) -> tuple[task_pb2.Task, str] | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[task_pb2.Task, str]]:
        """The stored tasks among `keys` (podmeta.key_string), with their pod uids, by key."""
        rows = self.db.rows_for_keys("SELECT key, task, pod_uid FROM tasks WHERE key IN ({})", keys)
        return {key: (task_pb2.Task.FromString(blob), uid) for key, blob, uid in rows}

    def tombstones(self, keys: Sequence[str]) -> dict[str, Tombstone]:
        """The tombstone of each of `keys` whose task pruning deleted, by key."""
        rows = self.db.rows_for_keys("SELECT key, task, pruned_at FROM pruned_tasks WHERE key IN ({})", keys)
        return {key: Tombstone(task_pb2.Task.FromString(blob), float(at)) for key, blob, at in rows}

    def cursor(self, source: str) -> int:
        row = self.db.reader.execute("SELECT cursor FROM cursors WHERE source = ?", (source,)).fetchone()
        return int(row[0]) if row else 0

    def unfinished(self) -> list[tuple[task_pb2.Task, str]]:
        rows = self.db.reader.execute(
            "SELECT task, pod_uid FROM tasks WHERE state IN (?, ?, ?)",
            (task_pb2.TASK_STATE_QUEUED, task_pb2.TASK_STATE_RUNNING, task_pb2.TASK_STATE_ADOPTED),
        ).fetchall()
        return [(task_pb2.Task.FromString(blob), uid) for blob, uid in rows]

    def acted_on(self, pod_uid: str) -> bool:
        """Whether an action (delete or mark done) was ever recorded for the pod."""
        row = self.db.reader.execute("SELECT 1 FROM pod_actions WHERE pod_uid = ?", (pod_uid,)).fetchone()
        return row is not None

    def pending_actions(self) -> list[PodActionRow]:
        rows = self.db.reader.execute(
            "SELECT a.pod_uid, a.namespace, a.name, a.action, "
            "coalesce(p.task_key, ''), coalesce(p.keep_log, 0), coalesce(p.read_events, 0) "
            "FROM pod_actions a LEFT JOIN post_mortems p ON p.pod_uid = a.pod_uid "
            "WHERE a.done = 0 ORDER BY a.rowid"
        ).fetchall()
        return [
            PodActionRow(uid, ns, name, action, key, bool(keep), bool(events))
            for uid, ns, name, action, key, keep, events in rows
        ]

    def kept_log(self, key: str) -> tuple[str, bytes] | None:
        """The log tail kept for the task (podmeta.key_string), with the uid of its pod."""
        row = self.db.reader.execute(
            "SELECT pod_uid, tail FROM kept_logs WHERE task_key = ?", (key,)
        ).fetchone()
        return (str(row[0]), bytes(row[1])) if row is not None else None

    def actions_done(self, uids: Sequence[str]) -> dict[str, bool]:
        """For the pods among `uids` that have an action recorded: whether it was carried out."""
        rows = self.db.rows_for_keys("SELECT pod_uid, done FROM pod_actions WHERE pod_uid IN ({})", uids)
        return {uid: bool(done) for uid, done in rows}

    def list_tasks(
        self, *, page_size: int, after_key: str, state: int, dag_id: str
    ) -> tuple[list[task_pb2.Task], str]:
        clauses, params = ["key > ?"], [after_key]
        if state:
            clauses.append("state = ?")
            params.append(str(state))
        if dag_id:
            clauses.append("dag_id = ?")
            params.append(dag_id)
        rows = self.db.reader.execute(
            f"SELECT key, task FROM tasks WHERE {' AND '.join(clauses)} ORDER BY key LIMIT ?",
            (*params, page_size + 1),
        ).fetchall()
        tasks = [task_pb2.Task.FromString(blob) for _, blob in rows[:page_size]]
        next_key = rows[page_size - 1][0] if len(rows) > page_size else ""
        return tasks, encode_page_token(next_key) if next_key else ""

    # ---- writes --------------------------------------------------------------------------------

    async def commit(self, batch: Batch) -> Committed:
        """Commit one engine batch; call in batch order. Batch n commits only if batch n-1 did
        (checked in its own transaction): the engine applies the next batch while the last one
        commits, so after a failed commit a later batch could otherwise commit on top of state
        that is not on disk (a launch cursor past a task never stored). Once one fails, every
        later one raises StoreUnavailable, and the engine stops: its restart replays from the last
        committed cursors. (A restart is a new TaskStore, counting from what is committed.)"""
        self._batches += 1
        number = self._batches
        cursors = [*batch.cursors.items(), (_BATCHES, number)]
        # A finished task's row is made with its terminal transition; saved again later (failure
        # events, a stray pod of it), it is only updated: pruning may have deleted it since
        # (prune_finished), and a row inserted anew would outlive its log for ever.
        ended_now = {podmeta.key_string(c.task.key) for c in batch.changes if c.task.state in TERMINAL}
        task_rows, update_rows = [], []
        for key, (task, uid) in batch.tasks.items():
            if task.state in TERMINAL and key not in ended_now:
                update_rows.append((task.state, task.SerializeToString(), uid, key))
            else:
                task_rows.append((key, task.key.dag_id, task.state, task.SerializeToString(), uid))
        change_blobs = [change.SerializeToString() for change in batch.changes]

        def write(conn: sqlite3.Connection) -> list[PodActionRow] | None:
            row = conn.execute("SELECT cursor FROM cursors WHERE source = ?", (_BATCHES,)).fetchone()
            if (row[0] if row else 0) != number - 1:
                return None  # a refusal, returned: raising would re-run the whole group commit
            conn.executemany(
                "INSERT INTO tasks(key, dag_id, state, task, pod_uid) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET "
                "state = excluded.state, task = excluded.task, pod_uid = excluded.pod_uid",
                task_rows,
            )
            conn.executemany("UPDATE tasks SET state = ?, task = ?, pod_uid = ? WHERE key = ?", update_rows)
            for change, blob in zip(batch.changes, change_blobs, strict=True):
                # The cursor is set here, before the commit makes the change readable to followers.
                change.cursor = self.transitions.append(conn, blob, change)
            fresh = []
            for row in batch.actions:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO pod_actions(pod_uid, namespace, name, action) VALUES (?, ?, ?, ?)",
                    (row.pod_uid, row.namespace, row.name, row.action),
                )
                if cur.rowcount == 1:
                    fresh.append(row)
                    if row.keep_log or row.read_events:
                        conn.execute(
                            "INSERT OR IGNORE INTO post_mortems(pod_uid, task_key, keep_log, read_events) "
                            "VALUES (?, ?, ?, ?)",
                            (row.pod_uid, row.task_key, row.keep_log, row.read_events),
                        )
            conn.executemany(
                "INSERT INTO cursors(source, cursor) VALUES (?, ?) "
                "ON CONFLICT(source) DO UPDATE SET cursor = excluded.cursor",
                cursors,
            )
            return fresh

        fresh = await self.db.write(write)
        if fresh is None:
            raise StoreUnavailable(
                self.db.path, f"batch {number - 1} was not committed, so batch {number} is not"
            )
        return Committed(batch.changes, fresh)

    async def reopen_action(self, uid: str) -> PodActionRow | None:
        """Mark a recorded action not done again (its pod is still there, uncleaned), returning it."""

        def write(conn: sqlite3.Connection) -> PodActionRow | None:
            row = conn.execute(
                "UPDATE pod_actions SET done = 0 WHERE pod_uid = ? AND done = 1 "
                "RETURNING pod_uid, namespace, name, action",
                (uid,),
            ).fetchone()
            return PodActionRow(*row) if row is not None else None

        reopened: PodActionRow | None = await self.db.write(write)
        return reopened

    async def keep_log(self, key: str, pod_uid: str, tail: bytes, *, max_kept: int) -> None:
        """Keep a finished task's log tail (replacing an earlier one of the task), and only the
        newest `max_kept` tails in all."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM kept_logs WHERE task_key = ?", (key,))
            cur = conn.execute(
                "INSERT INTO kept_logs(task_key, pod_uid, tail) VALUES (?, ?, ?)", (key, pod_uid, tail)
            )
            conn.execute("DELETE FROM kept_logs WHERE seq <= ?", ((cur.lastrowid or 0) - max_kept,))

        await self.db.write(write)

    async def finish_actions(self, uids: Sequence[str]) -> None:
        await self.db.write(
            lambda conn: conn.executemany(
                "UPDATE pod_actions SET done = 1 WHERE pod_uid = ?", [(u,) for u in uids]
            )
        )


def prune_finished(
    conn: sqlite3.Connection, pruned: list[tuple[int, bytes]], *, bounds: Retention, now: float | None = None
) -> int:
    """Writer thread, as transitions are pruned (shepherd.retention): a task goes with its terminal
    transition, so a snapshot (ListTasks) never lists a task whose history is gone from the log.
    A task is deleted only if it is still in that terminal state: never one that is not finished.
    The action done on each of a deleted task's pods goes too (its current one, and those of the
    attempts before a relaunch), whichever it was (a deleted pod is never seen again; a pod marked
    done left the executor's selector), and so does what was read of it
    (its post-mortem row, its kept log tail). An action not yet carried out stays, with its
    post-mortem row, until the restart that carries it out (rare: pruning comes long after).

    What stays is a tombstone: the key, its terminal state and when its launch was accepted. By
    count, a task can be pruned before the reconciler has read its launch events (the launcher's
    stream lagged behind the watcher's), and after a restart, its memory of finished tasks empty,
    such an event would make the task anew, QUEUED, and relaunch it. The tombstone makes it a
    finished task's event instead (statemachine.is_new_life). It is kept a retention period, and
    at most `bounds.max_entries` of them: by then the launcher, pruning its own log by the same
    bounds, has pruned those events too."""
    now = time.time() if now is None else now
    finished: list[task_pb2.Task] = []
    for _, blob in pruned:
        task = task_pb2.TaskStateChange.FromString(blob).task
        if task.state in TERMINAL:
            finished.append(task)
    deleted = 0
    for task in finished:
        key = podmeta.key_string(task.key)
        row = conn.execute(
            "DELETE FROM tasks WHERE key = ? AND state = ? RETURNING pod_uid", (key, task.state)
        )
        for (uid,) in row.fetchall():
            deleted += 1
            kept = task_pb2.Task(
                state=task.state, queued_time=task.queued_time if task.HasField("queued_time") else None
            )
            kept.key.CopyFrom(task.key)
            conn.execute(
                "INSERT OR REPLACE INTO pruned_tasks(key, task, pruned_at) VALUES (?, ?, ?)",
                (key, kept.SerializeToString(), now),
            )
            conn.execute("DELETE FROM kept_logs WHERE task_key = ?", (key,))
            # Its current pod by uid (whatever its name), each attempt's pod by name; then what
            # was read of each pod whose action went.
            uids = {uid} if uid else set()
            if uid:
                conn.execute("DELETE FROM pod_actions WHERE pod_uid = ? AND done = 1", (uid,))
            for attempt in range(1, max(task.launch_attempts, 1) + 1):
                done = conn.execute(
                    "DELETE FROM pod_actions WHERE name = ? AND namespace = ? AND done = 1 RETURNING pod_uid",
                    (podmeta.pod_name(task.key, attempt), task.namespace),
                )
                uids.update(found for (found,) in done.fetchall())
            for found in uids:
                conn.execute(
                    "DELETE FROM post_mortems WHERE pod_uid = ? "
                    "AND NOT EXISTS (SELECT 1 FROM pod_actions WHERE pod_uid = ? AND done = 0)",
                    (found, found),
                )
    conn.execute("DELETE FROM pruned_tasks WHERE pruned_at < ?", (now - bounds.period_s,))
    if bounds.max_entries:
        # Newest last by rowid (a replaced tombstone gets a new one): one index probe, not a count.
        conn.execute(
            "DELETE FROM pruned_tasks WHERE rowid <= (SELECT max(rowid) FROM pruned_tasks) - ?",
            (bounds.max_entries,),
        )
    return deleted


def _decode_change(cursor: int, blob: bytes) -> task_pb2.TaskStateChange:
    change = task_pb2.TaskStateChange.FromString(blob)
    change.cursor = cursor  # stored without it: the row's key is the cursor
    return change


def encode_page_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def decode_page_token(token: str) -> str:
    """The key to continue after; ValueError when the token was not made by encode_page_token."""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError("malformed page token") from err


__all__ = ["Batch", "Committed", "PodActionRow", "TaskStore", "Tombstone", "prune_finished"]
