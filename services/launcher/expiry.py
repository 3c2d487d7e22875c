"""Which launches the launcher may forget, and when: its half of the retention (shepherd.retention).

A launch is what makes LaunchTask idempotent: a repeated LaunchTask finds it by key and creates
nothing. So a launch is kept for as long as its task may still be launched again by a scheduler
that means the same try: until its task ended longer ago than the retention period.

- A launch still waiting for its pod (ACCEPTED) is never forgotten: it is work to do.
- A FAILED or CANCELLED launch goes with its last event: its task ended when that event was
  logged (the launcher failed it, or the reconciler had revoked the task first).
- A CREATED launch's pod may run for longer than the retention. When its last event is pruned it
  is queued in `launch_expiry`, and the reconciler, which owns task state, is asked about its
  task: the launch goes once the task ended a retention period ago; otherwise it is asked again
  later. While the reconciler does not answer, nothing is forgotten. A task the reconciler no
  longer has was pruned there: by age it ended a retention period ago, but by count
  (retention_max_entries) it may have ended a moment ago, so the launch is still kept until its
  pod was created a retention period ago: a task that ran is never launched again by a repeated
  LaunchTask within that time.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass

from services.launcher.reconciler_client import ReconcilerClient, ReconcilerUnavailable
from services.launcher.store import Launch, LaunchStore
from shepherd import podmeta
from shepherd.logging import get_logger
from shepherd.retention import Retention, run_ticks
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2, task_pb2

_GONE_WITH_LAST_EVENT = frozenset(
    {launcher_service_pb2.LAUNCH_STATE_FAILED, launcher_service_pb2.LAUNCH_STATE_CANCELLED}
)
_ASK_AT_ONCE = 32  # GetTask calls in flight per expiry tick


def prune_launches(conn: sqlite3.Connection, pruned: list[tuple[int, bytes]], now: float) -> int:
    """Writer thread, as launch events are pruned: forget or queue the launches they were the last
    event of (the stored launch is byte for byte the event). Returns launches forgotten."""
    forgotten = 0
    for _, blob in pruned:
        launch = Launch.FromString(blob)
        if launch.state == launcher_service_pb2.LAUNCH_STATE_ACCEPTED:
            continue
        key = podmeta.key_string(launch.key)
        if launch.state in _GONE_WITH_LAST_EVENT:
            forgotten += conn.execute(
                "DELETE FROM launches WHERE key = ? AND launch = ?", (key, blob)
            ).rowcount
        elif launch.state == launcher_service_pb2.LAUNCH_STATE_CREATED:
            last = conn.execute("SELECT 1 FROM launches WHERE key = ? AND launch = ?", (key, blob)).fetchone()
            if last is not None:
                conn.execute("INSERT OR IGNORE INTO launch_expiry(key, due) VALUES (?, ?)", (key, now))
    return forgotten


@dataclass(frozen=True)
class Verdict:
    key: str
    blob: bytes
    forget: bool
    due: float  # when to ask again, if not forgotten


def judge(task: task_pb2.Task | None, *, now: float, period_s: float, created: float) -> tuple[bool, float]:
    """Whether to forget a CREATED launch (its pod created at `created`) given the reconciler's
    record of its task, and if not, when to ask again. No record: the reconciler pruned the task,
    which it ended after its pod was created."""
    if task is None:
        return created + period_s <= now, created + period_s
    if task.state not in TERMINAL:
        return False, now + period_s
    ended = task.end_time.ToNanoseconds() / 1e9 if task.HasField("end_time") else now
    return ended + period_s <= now, ended + period_s


class LaunchExpiry:
    """The root task that settles queued CREATED launches, a bounded number per tick."""

    def __init__(self, store: LaunchStore, reconciler: ReconcilerClient, retention: Retention) -> None:
        self._store = store
        self._reconciler = reconciler
        self._retention = retention
        self.forgotten = 0
        self._log = get_logger(component="retention", log="launches")

    async def tick(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        rows = self._store.db.reader.execute(
            "SELECT e.key, l.launch FROM launch_expiry e LEFT JOIN launches l ON l.key = e.key "
            "WHERE e.due <= ? ORDER BY e.due LIMIT ?",
            (now, self._retention.batch),
        ).fetchall()
        if not rows:
            return 0
        verdicts: list[Verdict] = []
        created = []
        for key, blob in rows:
            if blob and Launch.FromString(blob).state == launcher_service_pb2.LAUNCH_STATE_CREATED:
                created.append((key, blob))
            else:  # gone already, or relaunched since: its next last event queues it again
                verdicts.append(Verdict(key, b"", True, now))
        for start in range(0, len(created), _ASK_AT_ONCE):
            chunk = created[start : start + _ASK_AT_ONCE]
            try:
                tasks = await asyncio.gather(
                    *(
                        self._reconciler.get_task(Launch.FromString(blob).key, stored_only=True)
                        for _, blob in chunk
                    )
                )
            except ReconcilerUnavailable as err:
                self._log.info("the reconciler did not answer; launches are kept for now", error=str(err))
                break
            for (key, blob), task in zip(chunk, tasks, strict=True):
                launch = Launch.FromString(blob)
                made = launch.create_time.ToNanoseconds() / 1e9 if launch.HasField("create_time") else 0.0
                forget, due = judge(task, now=now, period_s=self._retention.period_s, created=made)
                verdicts.append(Verdict(key, bytes(blob), forget, due))

        def write(conn: sqlite3.Connection) -> int:
            forgotten = 0
            for verdict in verdicts:
                if verdict.forget:
                    # Only the launch as judged: a relaunch since (a new event) keeps it.
                    forgotten += conn.execute(
                        "DELETE FROM launches WHERE key = ? AND launch = ?", (verdict.key, verdict.blob)
                    ).rowcount
                    conn.execute("DELETE FROM launch_expiry WHERE key = ?", (verdict.key,))
                else:
                    conn.execute("UPDATE launch_expiry SET due = ? WHERE key = ?", (verdict.due, verdict.key))
            return forgotten

        forgotten = await self._store.db.write_soon(write, lazy=True) if verdicts else 0
        self.forgotten += forgotten
        if forgotten:
            self._log.info("forgot launches whose task ended a retention period ago", launches=forgotten)
        return forgotten

    async def run(self) -> None:
        await run_ticks(self.tick, self._retention, self._log, "launch expiry skipped")


__all__ = ["LaunchExpiry", "judge", "prune_launches"]
