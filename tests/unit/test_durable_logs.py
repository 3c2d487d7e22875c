"""The SQLite-backed cursor log (shepherd.sqlite.TableLog): entries are readable only once their
transaction commits, the in-memory tail and the table always tell the same story, and lazy writes
share commits without being lost."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from shepherd.eventlog import CursorOutOfRange
from shepherd.sqlite import Database, TableLog

SCHEMA = "CREATE TABLE IF NOT EXISTS entries (cursor INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);"


def _open(path: Path, tail: int = 4096) -> tuple[Database, TableLog[str]]:
    db = Database(path, SCHEMA, synchronous="NORMAL")
    return db, TableLog(db, "entries", "body", lambda _, blob: blob.decode(), "entry", tail=tail)


def _appender(log: TableLog[str], *items: str, fail: bool = False):  # type: ignore[no-untyped-def]
    def write(conn: sqlite3.Connection) -> list[int]:
        cursors = [log.append(conn, item.encode(), item) for item in items]
        if fail:
            raise ValueError("this write fails after appending")
        return cursors

    return write


async def test_appended_entries_are_read_in_order_once_committed(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db")
    assert await db.write(_appender(log, "a", "b")) == [1, 2]
    await db.write(_appender(log, "c"))
    assert log.head() == 3
    assert log.read_after(0, 10) == [(1, "a"), (2, "b"), (3, "c")]
    assert log.read_after(2, 10) == [(3, "c")]
    assert log.read_after(3, 10) == []
    await db.close()


async def test_a_failed_write_leaves_no_entry_behind_in_memory_or_on_disk(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db")
    ok = db.write_soon(_appender(log, "a"))
    bad = db.write_soon(_appender(log, "lost", fail=True))
    after = db.write_soon(_appender(log, "b"))
    assert await ok == [1]
    with pytest.raises(ValueError, match="fails after appending"):
        await bad
    assert await after == [2]  # the rolled-back cursor is reused: no gap
    assert log.read_after(0, 10) == [(1, "a"), (2, "b")]
    await db.close()
    _, reopened = _open(tmp_path / "log.db")
    assert reopened.read_after(0, 10) == [(1, "a"), (2, "b")]


async def test_cursors_older_than_the_memory_tail_are_read_from_the_table(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db", tail=2)
    for i in range(10):
        await db.write(_appender(log, f"e{i}"))
    assert log.read_after(0, 3) == [(1, "e0"), (2, "e1"), (3, "e2")]
    assert log.read_after(8, 10) == [(9, "e8"), (10, "e9")]
    with pytest.raises(CursorOutOfRange):
        log.read_after(11, 10)
    await db.close()


async def test_a_reopened_log_continues_the_cursors_of_the_last_run(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db")
    await db.write(_appender(log, "a", "b"))
    await db.close()
    db, log = _open(tmp_path / "log.db")
    assert log.head() == 2
    await db.write(_appender(log, "c"))
    assert log.read_after(1, 10) == [(2, "b"), (3, "c")]
    await db.close()


async def test_a_follower_waiting_at_the_head_is_woken_by_the_commit(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db")
    waiter = asyncio.create_task(log.wait_for_append(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    await db.write(_appender(log, "a"))
    await asyncio.wait_for(waiter, 1)
    await db.close()


async def test_lazy_writes_share_a_commit_and_an_urgent_write_takes_them_along(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db")
    db.lazy_linger_s = 60.0  # far longer than the test: only the urgent write can end the wait
    lazy = [db.write_soon(_appender(log, f"lazy{i}"), lazy=True) for i in range(3)]
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in lazy)
    assert log.head() == 0
    await db.write(_appender(log, "urgent"))
    assert all(f.done() for f in lazy)
    assert [item for _, item in log.read_after(0, 10)] == ["lazy0", "lazy1", "lazy2", "urgent"]
    await db.close()


async def test_closing_commits_the_lazy_writes_still_waiting(tmp_path: Path) -> None:
    db, log = _open(tmp_path / "log.db")
    db.lazy_linger_s = 60.0
    lazy = db.write_soon(_appender(log, "late"), lazy=True)
    await db.close()
    assert lazy.done()
    assert lazy.result() == [1]
    _, reopened = _open(tmp_path / "log.db")
    assert reopened.read_after(0, 10) == [(1, "late")]


async def test_a_write_that_breaks_its_own_transaction_fails_its_batch_and_the_database_carries_on(
    tmp_path: Path,
) -> None:
    db, log = _open(tmp_path / "log.db")

    def sabotage(conn: sqlite3.Connection) -> None:
        log.append(conn, b"doomed", "doomed")
        conn.execute("ROLLBACK")  # ends the batch's transaction (and any savepoint) under its feet
        raise ValueError("after rolling back")

    bad = db.write_soon(sabotage)
    with pytest.raises(sqlite3.Error):  # the savepoint it also destroyed on the retry
        await bad
    assert await db.write(_appender(log, "next")) == [1]
    assert log.read_after(0, 10) == [(1, "next")]
    await db.close()
