"""Bounded stores: the oldest entries of a durable cursor log are pruned in the background.

The launcher's launch events and the reconciler's transitions would otherwise grow forever. A
log keeps what is younger than the retention period and, when a count is set, at most that many
entries; what it prunes takes with it the records it was the last word on (a finished task, a
launch whose task is over), as each store decides in its `on_pruned` hook.

Age without a time column: each tick writes a mark (now, head cursor) into `retention_marks`.
Every entry up to a mark's cursor was committed before the mark's time, so the newest mark older
than the period gives the cursor up to which everything is old enough. Marks cost one small row
per tick (none while the log is idle: an older mark of the same head says as much), and
resolution is the tick interval.

Never on the hot path: a tick deletes at most `batch` entries per transaction, by cursor range
on the primary key (no scan of the table), through the store's group-commit writer as lazy writes
that share commits with the service's own writes. Before rows go, the log is told (forget_through)
so that no reader is served a gap: a cursor from before the pruned range gets OUT_OF_RANGE.

SQLite reuses the pages freed by deletes, so once retention applies the file stops growing
(measured in tests/unit/test_retention.py); nothing is vacuumed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shepherd.logging import BoundLogger, get_logger
from shepherd.settings import StoreSettings
from shepherd.sqlite import Database, StoreUnavailable, TableLog

SCHEMA = """
CREATE TABLE IF NOT EXISTS retention_marks (
    log TEXT NOT NULL,             -- the log's table
    at REAL NOT NULL,              -- Unix time of the mark
    cursor INTEGER NOT NULL,       -- the log's head at that time
    PRIMARY KEY (log, at)
);
"""


@dataclass(frozen=True)
class Retention:
    period_s: float
    max_entries: int = 0
    interval_s: float = 10.0
    batch: int = 500

    @classmethod
    def of(cls, settings: StoreSettings) -> Retention:
        return cls(
            settings.retention_s,
            settings.retention_max_entries,
            settings.retention_interval_s,
            settings.retention_batch,
        )


# Writer thread, inside the prune transaction: the rows (cursor, blob) just deleted from the log;
# delete what they were the last word on, and return how many such records went.
OnPruned = Callable[[sqlite3.Connection, list[tuple[int, bytes]]], int]


class Pruner:
    """Prunes one TableLog of one Database; `run` is a service's root task."""

    def __init__(
        self, db: Database, log: TableLog[Any], column: str, retention: Retention, on_pruned: OnPruned
    ) -> None:
        self._db = db
        self._log = log
        self._retention = retention
        self._on_pruned = on_pruned
        self._delete_sql = f"DELETE FROM {log.table} WHERE cursor <= ? RETURNING cursor, {column}"
        # The head of the last mark written: an idle log needs no new one, and an empty log (head
        # 0) none at all, so a fresh service's first commit is its own work, not a mark.
        self._marked = 0
        self.pruned_entries = 0
        self.pruned_records = 0
        self._log_ = get_logger(component="retention", log=log.table)

    def cutoff(self, now: float) -> int:
        """The cursor up to which entries are due for pruning (by age or by count)."""
        row = self._db.reader.execute(
            "SELECT cursor FROM retention_marks WHERE log = ? AND at <= ? ORDER BY at DESC LIMIT 1",
            (self._log.table, now - self._retention.period_s),
        ).fetchone()
        by_age = int(row[0]) if row else 0
        by_count = self._log.head() - self._retention.max_entries if self._retention.max_entries else 0
        return max(by_age, by_count, 0)

    def _mark(self, now: float, head: int) -> Callable[[sqlite3.Connection], None]:
        table, period = self._log.table, self._retention.period_s

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO retention_marks(log, at, cursor) VALUES (?, ?, ?)", (table, now, head)
            )
            # Keep the newest mark that is old enough (the next cutoff) and everything younger.
            conn.execute(
                "DELETE FROM retention_marks WHERE log = ? AND at < (SELECT at FROM retention_marks "
                "WHERE log = ? AND at <= ? ORDER BY at DESC LIMIT 1)",
                (table, table, now - period),
            )

        return write

    def _delete(self, upto: int) -> Callable[[sqlite3.Connection], tuple[int, int]]:
        def write(conn: sqlite3.Connection) -> tuple[int, int]:
            rows = [(int(c), bytes(b)) for c, b in conn.execute(self._delete_sql, (upto,)).fetchall()]
            return len(rows), self._on_pruned(conn, rows) if rows else 0

        return write

    async def tick(self, now: float | None = None) -> int:
        """Mark the head, then prune what is due, a batch per transaction. Returns entries pruned."""
        now = time.time() if now is None else now
        if (head := self._log.head()) != self._marked:
            await self._db.write_soon(self._mark(now, head), lazy=True)
            self._marked = head
        cutoff = self.cutoff(now)
        pruned = 0
        while (oldest := self._log.oldest()) < cutoff:
            upto = min(cutoff, oldest + self._retention.batch)
            self._log.forget_through(upto)  # before the rows go: no reader is served a gap
            entries, records = await self._db.write_soon(self._delete(upto), lazy=True)
            pruned += entries
            self.pruned_entries += entries
            self.pruned_records += records
            await asyncio.sleep(0)  # let the service's own work in between batches
        if pruned:
            self._log_.info("pruned", entries=pruned, oldest_cursor=self._log.oldest())
        return pruned

    async def run(self) -> None:
        await run_ticks(self.tick, self._retention, self._log_, "retention skipped")


async def run_ticks(
    tick: Callable[[], Awaitable[object]], retention: Retention, log: BoundLogger, skipped: str
) -> None:
    """Call `tick` once per retention interval, for ever. A store that cannot write skips the tick
    (its own health check reports it) and the next one tries again; anything else ends the loop,
    for the service's supervisor to act on."""
    while True:
        try:
            await tick()
        except StoreUnavailable as err:
            log.warning(f"{skipped}: the store cannot write", error=err.cause)
        await asyncio.sleep(retention.interval_s)


__all__ = ["SCHEMA", "OnPruned", "Pruner", "Retention", "run_ticks"]
