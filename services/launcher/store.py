"""The launcher's durable memory: every accepted launch, and the ordered log of launch events.

A launch is written (and committed) before LaunchTask answers OK, so an acknowledged task survives
a kill at any point: on start, launches still ACCEPTED are replayed. The key is the primary key,
so a retried or concurrent launch of the same key finds the first one instead of making another.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from shepherd import podmeta, retention, timestamps
from shepherd.sqlite import Database, Synchronous, TableLog
from shepherd.v1 import launcher_service_pb2, task_pb2

Launch = launcher_service_pb2.Launch

SCHEMA = """
CREATE TABLE IF NOT EXISTS launches (
    key TEXT PRIMARY KEY,           -- podmeta.key_string(TaskKey)
    launch BLOB NOT NULL,           -- serialized shepherd.v1.Launch
    pod BLOB NOT NULL,              -- the pod to create, as JSON
    state INTEGER NOT NULL          -- LaunchState, duplicated for the replay query
);
CREATE INDEX IF NOT EXISTS launches_by_state ON launches(state);
CREATE TABLE IF NOT EXISTS launch_events (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    launch BLOB NOT NULL
);
-- The cursor of each launch's last event (GetLaunch answers it): a table of its own, so a store
-- made before it existed opens unchanged; its row goes with the launch.
CREATE TABLE IF NOT EXISTS launch_cursors (
    key TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS launch_cursors_forget AFTER DELETE ON launches BEGIN
    DELETE FROM launch_cursors WHERE key = old.key;
END;
"""
_SET_CURSOR = (
    "INSERT INTO launch_cursors(key, cursor) VALUES (?, ?) "
    "ON CONFLICT(key) DO UPDATE SET cursor = excluded.cursor"
)


# Retention (services/launcher/expiry.py): a launch whose pod was created outlives its last event
# until the reconciler says its task ended longer than the retention period ago.
EXPIRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS launch_expiry (
    key TEXT PRIMARY KEY,           -- a CREATED launch whose last event was pruned
    due REAL NOT NULL               -- Unix time at which to ask the reconciler about its task
);
CREATE INDEX IF NOT EXISTS launch_expiry_due ON launch_expiry(due);
"""


@dataclass(frozen=True)
class Accepted:
    launch: Launch
    pod: dict[str, object]
    already_existed: bool


class LaunchStore:
    def __init__(self, path: Path | str, *, synchronous: Synchronous = "FULL") -> None:
        self.db = Database(path, SCHEMA + EXPIRY_SCHEMA + retention.SCHEMA, synchronous=synchronous)
        self.events: TableLog[Launch] = TableLog(
            self.db, "launch_events", "launch", lambda _, blob: Launch.FromString(blob), "launch event"
        )

    async def close(self) -> None:
        await self.db.close()

    # ---- reads (event-loop thread) ------------------------------------------------------------

    def get(self, key: task_pb2.TaskKey) -> Launch | None:
        name = podmeta.key_string(key)
        return self.get_many([name]).get(name)

    def get_with_cursor(self, key: task_pb2.TaskKey) -> tuple[Launch, int] | None:
        """The launch, with the cursor of its last event (0 if it was stored before that was kept)."""
        row = self.db.reader.execute(
            "SELECT l.launch, coalesce(c.cursor, 0) FROM launches l "
            "LEFT JOIN launch_cursors c ON c.key = l.key WHERE l.key = ?",
            (podmeta.key_string(key),),
        ).fetchone()
        return (Launch.FromString(row[0]), int(row[1])) if row is not None else None

    def get_many(self, keys: Sequence[str]) -> dict[str, Launch]:
        """The stored launches among `keys` (podmeta.key_string), by key: one query per 500 keys."""
        rows = self.db.rows_for_keys("SELECT key, launch FROM launches WHERE key IN ({})", keys)
        return {key: Launch.FromString(blob) for key, blob in rows}

    def pending(self) -> list[tuple[Launch, dict[str, object]]]:
        """Launches accepted but not yet created: the work to replay on start."""
        rows = self.db.reader.execute(
            "SELECT launch, pod FROM launches WHERE state = ? ORDER BY rowid",
            (launcher_service_pb2.LAUNCH_STATE_ACCEPTED,),
        ).fetchall()
        return [(Launch.FromString(launch), orjson.loads(pod)) for launch, pod in rows]

    # ---- writes (group-committed) -------------------------------------------------------------

    async def accept(self, items: Sequence[tuple[Launch, dict[str, object]]]) -> list[Accepted]:
        """Store new launches in one transaction; for a key already stored (by an earlier call, or
        earlier in `items`), the stored launch is returned instead. In the order of `items`."""
        rows = []
        for launch, pod in items:
            timestamps.stamp_now(launch.accept_time)
            launch.state = launcher_service_pb2.LAUNCH_STATE_ACCEPTED
            rows.append(
                (podmeta.key_string(launch.key), launch, launch.SerializeToString(), orjson.dumps(pod))
            )

        def insert(conn: sqlite3.Connection) -> list[tuple[bytes, bytes] | None]:
            stored: list[tuple[bytes, bytes] | None] = []
            for key, launch, blob, pod_json in rows:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO launches(key, launch, pod, state) VALUES (?, ?, ?, ?)",
                    (key, blob, pod_json, launch.state),
                )
                if cur.rowcount == 1:
                    conn.execute(_SET_CURSOR, (key, self.events.append(conn, blob, launch)))
                    stored.append(None)
                else:
                    stored.append(
                        conn.execute("SELECT launch, pod FROM launches WHERE key = ?", (key,)).fetchone()
                    )
            return stored

        return [
            Accepted(launch, pod, False)
            if existing is None
            else Accepted(Launch.FromString(existing[0]), orjson.loads(existing[1]), True)
            for (launch, pod), existing in zip(items, await self.db.write(insert), strict=True)
        ]

    async def update(self, launch: Launch, *, only_if_state: int | None = None) -> Launch | None:
        """Persist a new state of a launch and log it; with `only_if_state`, only from that state."""
        return launch if await self.update_soon(launch, only_if_state=only_if_state, lazy=False) else None

    def update_soon(
        self, launch: Launch, *, only_if_state: int | None = None, lazy: bool = True
    ) -> asyncio.Future[bool]:
        """update() for a caller that does not wait for the commit (so, by default, a lazy write:
        it may wait a few milliseconds to share a commit); the future says whether the launch
        changed. `launch` must not be modified afterwards.

        With `only_if_state`, the stored launch must also still be at `launch.attempt`: an outcome
        written late (held while the store was full) must not land on a relaunch made meanwhile,
        which would mark the new attempt CREATED before its pod exists."""
        key = podmeta.key_string(launch.key)
        blob = launch.SerializeToString()

        def write(conn: sqlite3.Connection) -> bool:
            if only_if_state is None:
                cur = conn.execute(
                    "UPDATE launches SET launch = ?, state = ? WHERE key = ?", (blob, launch.state, key)
                )
            else:
                row = conn.execute(
                    "SELECT launch FROM launches WHERE key = ? AND state = ?", (key, only_if_state)
                ).fetchone()
                if row is None or Launch.FromString(row[0]).attempt != launch.attempt:
                    return False
                cur = conn.execute(
                    "UPDATE launches SET launch = ?, state = ? WHERE key = ?", (blob, launch.state, key)
                )
            if cur.rowcount != 1:
                return False
            conn.execute(_SET_CURSOR, (key, self.events.append(conn, blob, launch)))
            return True

        return self.db.write_soon(write, lazy=lazy)

    async def relaunch(
        self, key: task_pb2.TaskKey, from_attempt: int
    ) -> tuple[Launch, dict[str, object], bool]:
        """Move a launch to attempt `from_attempt + 1` with a fresh pod, atomically, once.

        Returns the launch, its pod, and whether this call made the new attempt. Raises LookupError
        if the task was never launched, and ValueError if the launch failed or was cancelled."""
        name = podmeta.key_string(key)

        # A refusal is returned, not raised: a raising write makes its whole group commit run again
        # with a savepoint per write (see Database._run_batch), which is for real failures.
        def write(conn: sqlite3.Connection) -> tuple[bytes, bytes, bool] | Exception:
            row = conn.execute("SELECT launch, pod FROM launches WHERE key = ?", (name,)).fetchone()
            if row is None:
                return LookupError("key: this task was never launched here")
            launch = Launch.FromString(row[0])
            if launch.state in (
                launcher_service_pb2.LAUNCH_STATE_FAILED,
                launcher_service_pb2.LAUNCH_STATE_CANCELLED,
            ):
                state = launcher_service_pb2.LaunchState.Name(launch.state)
                return ValueError(f"the launch is {state}: there is nothing to relaunch")
            if launch.attempt != from_attempt:
                return row[0], row[1], False
            pod = orjson.loads(row[1])
            attempt = from_attempt + 1
            pod["metadata"]["name"] = podmeta.pod_name(key, attempt)
            pod["metadata"]["annotations"][podmeta.ANNOTATION_LAUNCH_ATTEMPT] = str(attempt)
            launch.attempt = attempt
            launch.pod_name = pod["metadata"]["name"]
            launch.state = launcher_service_pb2.LAUNCH_STATE_ACCEPTED
            launch.ClearField("create_time")
            blob, pod_json = launch.SerializeToString(), orjson.dumps(pod)
            conn.execute(
                "UPDATE launches SET launch = ?, pod = ?, state = ? WHERE key = ?",
                (blob, pod_json, launch.state, name),
            )
            conn.execute(_SET_CURSOR, (name, self.events.append(conn, blob, Launch.FromString(blob))))
            return blob, pod_json, True

        outcome = await self.db.write(write)
        if isinstance(outcome, Exception):
            raise outcome
        blob, pod_json, relaunched = outcome
        return Launch.FromString(blob), orjson.loads(pod_json), relaunched


def stamp_created(launch: Launch) -> Launch:
    updated = Launch()
    updated.CopyFrom(launch)
    updated.state = launcher_service_pb2.LAUNCH_STATE_CREATED
    timestamps.stamp_now(updated.create_time)
    return updated


def stamp_failed(launch: Launch, failure: task_pb2.FailureDetails) -> Launch:
    updated = Launch()
    updated.CopyFrom(launch)
    updated.state = launcher_service_pb2.LAUNCH_STATE_FAILED
    updated.failure.CopyFrom(failure)
    return updated


def stamp_cancelled(launch: Launch) -> Launch:
    updated = Launch()
    updated.CopyFrom(launch)
    updated.state = launcher_service_pb2.LAUNCH_STATE_CANCELLED
    return updated


__all__ = ["Accepted", "LaunchStore", "stamp_cancelled", "stamp_created", "stamp_failed"]
