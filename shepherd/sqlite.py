"""An embedded SQLite database with group commit, shared by the launcher and the reconciler.

Writes are functions run on one writer thread. Writes submitted while a transaction commits are
gathered into the next transaction, so N concurrent requests cost one fsync, not N, and each
caller's await returns only after its write is durable. Reads use a second connection on the
event-loop thread: WAL mode lets them proceed while the writer commits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from shepherd.eventlog import AppendSignal, CursorOutOfRange
from shepherd.logging import get_logger

T = TypeVar("T")
_SLOW_COMMIT_S = 0.1
Synchronous = Literal["OFF", "NORMAL", "FULL"]


class Database:
    """One SQLite file. `schema` is executed once at open (use IF NOT EXISTS)."""

    def __init__(self, path: Path | str, schema: str, *, synchronous: Synchronous = "FULL") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._writer = self._executor.submit(self._open_writer, schema, synchronous).result()
        self.reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.reader.execute("PRAGMA query_only=ON")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def _open_writer(self, schema: str, synchronous: Synchronous) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(schema)
        return conn

    def start(self) -> None:
        if self._loop_task is None:
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._commit_loop(), name="sqlite-group-commit")

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a transaction; returns once that transaction is committed."""
        return await self.write_soon(fn)

    def write_soon(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn` for the next transaction without waiting: the future resolves once it is
        committed. Writes keep their queueing order, and close() commits every queued one."""
        self.start()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        self._wake.set()
        return future

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            started = time.monotonic()
            results = await loop.run_in_executor(self._executor, self._run_batch, [fn for fn, _ in batch])
            elapsed = time.monotonic() - started
            if elapsed > _SLOW_COMMIT_S:
                get_logger(component="sqlite", path=self.path).warning(
                    "slow commit", seconds=round(elapsed, 3), writes=len(batch)
                )
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _run_batch(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        conn = self._writer
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        for fn in fns:
            conn.execute("SAVEPOINT op")
            try:
                results.append((True, fn(conn)))
                conn.execute("RELEASE op")
            except Exception as err:  # one bad write must not sink the others in its batch
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((False, err))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            conn.execute("ROLLBACK")
            return [(False, err) for _ in fns]
        return results

    async def close(self) -> None:
        if self._loop_task is not None:
            await self.write(lambda _: None)  # a barrier: every earlier write is committed
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._executor.submit(self._writer.close).result()
        self._executor.shutdown()
        self.reader.close()


class TableLog(Generic[T]):
    """A cursor log kept in one table (`cursor INTEGER PRIMARY KEY AUTOINCREMENT` plus one blob
    column): the launcher's launch events and the reconciler's transitions. Appends happen inside
    the owner's write transactions; the owner calls notify() once they are committed."""

    def __init__(self, db: Database, table: str, column: str, decode: Callable[[int, bytes], T], noun: str):
        self._db = db
        self._head_sql = f"SELECT COALESCE(MAX(cursor), 0) FROM {table}"
        self._read_sql = f"SELECT cursor, {column} FROM {table} WHERE cursor > ? ORDER BY cursor LIMIT ?"
        self._decode = decode
        self._noun = noun
        self._signal = AppendSignal()

    def head(self) -> int:
        return int(self._db.reader.execute(self._head_sql).fetchone()[0])

    def read_after(self, cursor: int, limit: int) -> list[tuple[int, T]]:
        rows = self._db.reader.execute(self._read_sql, (cursor, limit)).fetchall()
        if not rows and cursor > (head := self.head()):
            raise CursorOutOfRange(f"cursor {cursor} is ahead of the newest {self._noun} {head}")
        return [(c, self._decode(c, blob)) for c, blob in rows]

    async def wait_for_append(self, cursor: int) -> None:
        if self.head() > cursor:
            return
        await self._signal.wait()

    def notify(self) -> None:
        self._signal.notify()
