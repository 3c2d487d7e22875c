"""An embedded SQLite database with group commit, shared by the launcher and the reconciler.

Writes are functions run on one writer thread. Writes submitted while a transaction commits are
gathered into the next transaction, so N concurrent requests cost one fsync, not N, and each
caller's await returns only after its write is durable. Writes nobody waits on (lazy ones) may
linger a few milliseconds for company, which cuts commits, and so fsyncs and thread hand-offs,
several-fold under load. Reads use a second connection on the event-loop thread: WAL mode lets
them proceed while the writer commits.

A store that cannot write (a full disk, a volume gone read-only, an I/O error) fails the writes
of the transaction that hit it with StoreUnavailable, which is retryable: nothing of them was
kept. `writable` says whether the last transaction committed; `watch` reports its changes (so a
service can stop serving meanwhile) and probes the store until it can write again. Opening runs
a real write, so a store that cannot be used fails at start, naming its path and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from shepherd import failpoints, metrics
from shepherd.eventlog import AppendSignal, CursorOutOfRange
from shepherd.logging import get_logger

T = TypeVar("T")
_SLOW_COMMIT_S = 0.1
_KEYS_PER_QUERY = 500  # well under SQLite's limit on bound parameters
Synchronous = Literal["OFF", "NORMAL", "FULL"]

# A one-row table every store has: opening writes it, and so does the probe of a store that could
# not write, so either finds out with a real write.
_PROBE_SCHEMA = "CREATE TABLE IF NOT EXISTS store_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);"
_PROBE_SQL = "INSERT OR REPLACE INTO store_probe(id, at) VALUES (1, ?)"

# SQLite's primary result codes that speak of the store (its disk, its file, its locks), not of
# the statement: a write failing with one of them may well succeed later, unchanged.
_STORE_FAULT_CODES = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOLFS,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_READONLY,
}


class StoreUnavailable(Exception):
    """The store cannot be used right now: a full disk, a read-only or failing volume, a damaged
    file. What failed was not kept, so it can be tried again once the store works."""

    def __init__(self, path: str, cause: BaseException | str, *, doing: str = "write") -> None:
        self.path = path
        self.cause = cause if isinstance(cause, str) else str(cause) or type(cause).__name__
        super().__init__(f"the store at {path} cannot {doing}: {self.cause}")


def is_store_fault(error: BaseException) -> bool:
    """Whether `error` comes from the store's disk or file rather than from the code using it.
    (failpoints.FailpointError is an OSError, like the faults it stands in for.)"""
    if isinstance(error, StoreUnavailable | OSError):
        return True
    code = getattr(error, "sqlite_errorcode", None) if isinstance(error, sqlite3.Error) else None
    return code is not None and code & 0xFF in _STORE_FAULT_CODES


def explain(path: str, error: BaseException) -> str:
    """SQLite's own words for a store fault, plus what the filesystem says when those are vague
    ("unable to open database file", "disk I/O error" on a volume that went read-only)."""
    cause = str(error) or type(error).__name__
    directory = Path(path).parent
    with contextlib.suppress(OSError):
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{cause} (read-only file system)"
        if not os.access(directory, os.W_OK):
            return f"{cause} (its directory is not writable)"
    return cause


def _probe(conn: sqlite3.Connection) -> None:
    conn.execute(_PROBE_SQL, (time.time(),))


class Database:
    """One SQLite file. `schema` is executed once at open (use IF NOT EXISTS)."""

    def __init__(
        self,
        path: Path | str,
        schema: str,
        *,
        synchronous: Synchronous = "FULL",
        lazy_linger_s: float = 0.02,
    ) -> None:
        self.path = str(path)
        self.lazy_linger_s = lazy_linger_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._writer = self._executor.submit(self._open_writer, schema, synchronous).result()
            self.reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.reader.execute("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as err:
            self._executor.shutdown(wait=False)
            raise StoreUnavailable(self.path, explain(self.path, err), doing="be used") from err
        self.writable = True  # whether the last transaction committed
        metrics.register_store_metrics()
        metrics.SQLITE_WRITABLE.set(1)
        self._health = AppendSignal()  # notified when `writable` changes, or the commit loop dies
        self._dead: BaseException | None = None  # why the commit loop stopped, if it did
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._logs: list[TableLog[Any]] = []

    def rows_for_keys(self, query: str, keys: Sequence[str]) -> list[Any]:
        """Rows of `query`, a SELECT ending in `IN ({})`, for `keys`, read on the caller's thread:
        one statement per 500 keys rather than one per key."""
        rows: list[Any] = []
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            rows += self.reader.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def _open_writer(self, schema: str, synchronous: Synchronous) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(schema + _PROBE_SCHEMA)
            # A real write now: a store that cannot write fails at start, not at the first request.
            conn.execute("BEGIN IMMEDIATE")
            _probe(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def start(self) -> None:
        if self._loop_task is None:
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._commit_loop(), name="sqlite-group-commit")

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in a transaction; returns once that transaction is committed."""
        return await self.write_soon(fn)

    def write_soon(self, fn: Callable[[sqlite3.Connection], T], *, lazy: bool = False) -> asyncio.Future[T]:
        """Queue `fn` for a transaction without waiting: the future resolves once it is committed.
        Writes keep their queueing order, and close() commits every queued one. A lazy write may
        wait up to `lazy_linger_s` for other writes to share its commit; any other write (or
        close) commits it at once. `fn` may run twice (see _run_batch): what it does outside the
        connection it is given (other than TableLog.append) must bear repeating. It should return
        an expected refusal rather than raise it, since raising re-runs its whole batch."""
        self.start()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._dead is not None:
            future.set_exception(StoreUnavailable(self.path, f"its commit loop died ({self._dead!r})"))
            return future
        self._pending.append((fn, future))
        self._wake.set()
        if not lazy:
            self._urgent.set()
        return future

    async def _commit_loop(self) -> None:
        try:
            await self._commit_batches()
        except Exception as err:  # a bug: fail what waits, and let watch() stop the service
            self._dead = err
            for _, future in self._pending:
                if not future.done():
                    future.set_exception(StoreUnavailable(self.path, f"its commit loop died ({err!r})"))
            self._pending = []
            self._health.notify()

    async def _commit_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._urgent.is_set() and self.lazy_linger_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.lazy_linger_s)
            self._wake.clear()
            self._urgent.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            started = time.monotonic()
            try:
                results, appended, wrote = await loop.run_in_executor(
                    self._executor, self._run_batch, [fn for fn, _ in batch]
                )
            except Exception as err:  # the loop must outlive a failed batch, or every later write hangs
                if isinstance(err, StoreUnavailable):
                    self._set_writable(False, err)
                else:
                    get_logger(component="sqlite", path=self.path).error("write batch failed", error=str(err))
                results, appended = [(False, err) for _ in batch], []
            else:
                if wrote:  # a transaction that changed nothing commits even on a read-only disk
                    self._set_writable(True)
            for log, entries in appended:
                log._publish(entries)  # before the writers resume: what they committed is readable
            elapsed = time.monotonic() - started
            metrics.SQLITE_COMMIT_SECONDS.observe(elapsed)
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

    def _set_writable(self, writable: bool, error: StoreUnavailable | None = None) -> None:
        if writable == self.writable:
            return
        self.writable = writable
        metrics.SQLITE_WRITABLE.set(writable)
        log = get_logger(component="sqlite", path=self.path)
        if error is not None:
            log.error("the store cannot write: writes fail as retryable until it can", error=error.cause)
        else:
            log.info("the store can write again")
        self._health.notify()

    async def watch(
        self, on_change: Callable[[bool], Awaitable[None]], *, probe_every_s: float = 1.0
    ) -> None:
        """A service's root task: calls `on_change` whenever the store starts or stops being able
        to write, and while it cannot, tries a small write every `probe_every_s`, so the store is
        found working again even when nothing else writes (a service that is NOT_SERVING gets no
        requests). Raises if the commit loop has died: every write would hang."""
        self.start()
        reported = True
        while True:
            if self._dead is not None:
                raise RuntimeError(f"the commit loop of the store at {self.path} died") from self._dead
            if self.writable != reported:
                reported = self.writable
                await on_change(reported)
                continue
            if self.writable:
                await self._health.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._health.wait(), probe_every_s)
            if not self.writable and self._dead is None:
                with contextlib.suppress(StoreUnavailable):
                    await self.write(_probe)

    def _run_batch(
        self, fns: list[Callable[[sqlite3.Connection], Any]]
    ) -> tuple[list[tuple[bool, Any]], list[tuple[TableLog[Any], list[tuple[int, Any]]]], bool]:
        """Writer thread: _transaction, leaving no transaction open and nothing staged if it fails,
        and whether it changed any row. A failure of the store itself (see is_store_fault) is
        raised as StoreUnavailable."""
        changes = self._writer.total_changes
        try:
            results, appended = self._transaction(fns)
            return results, appended, self._writer.total_changes != changes
        except Exception as err:
            with contextlib.suppress(sqlite3.Error):
                self._abandon()
            if is_store_fault(err):
                raise StoreUnavailable(self.path, explain(self.path, err)) from err
            raise

    def _abandon(self) -> None:
        """Writer thread: roll back the open transaction (if SQLite has not already) and forget the
        log entries it staged."""
        for log in self._logs:
            log._staged = []
        if self._writer.in_transaction:
            self._writer.execute("ROLLBACK")

    def _transaction(
        self, fns: list[Callable[[sqlite3.Connection], Any]]
    ) -> tuple[list[tuple[bool, Any]], list[tuple[TableLog[Any], list[tuple[int, Any]]]]]:
        """Writer thread: one transaction for the batch. Returns each write's outcome and, per log,
        the entries the transaction appended (once committed).

        Writes rarely fail, so the batch first runs bare. If one raises, that attempt is rolled
        back and the batch runs again with each write in a savepoint, so only the failing ones are
        undone. (Savepoints on every write would cost two more statements each, every time.) A
        failure of the store itself, or of the COMMIT, fails the whole batch."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[tuple[bool, Any]] = [(True, fn(conn)) for fn in fns]
        except Exception as err:
            if is_store_fault(err):
                raise
            self._abandon()
            conn.execute("BEGIN IMMEDIATE")
            results = self._run_isolated(fns)
        appended = [(log, log._staged) for log in self._logs if log._staged]
        for log in self._logs:
            log._staged = []
        failpoints.hit("sqlite.commit")
        conn.execute("COMMIT")
        return results, appended

    def _run_isolated(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """Writer thread, inside a transaction: each write in a savepoint; a failing one is undone
        (with its log entries) and the others stand."""
        conn = self._writer
        results: list[tuple[bool, Any]] = []
        for fn in fns:
            marks = [len(log._staged) for log in self._logs]
            conn.execute("SAVEPOINT op")
            try:
                results.append((True, fn(conn)))
                conn.execute("RELEASE op")
            except Exception as err:  # one bad write must not sink the others in its batch
                if is_store_fault(err):
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                for log, mark in zip(self._logs, marks, strict=True):
                    del log._staged[mark:]
                results.append((False, err))
        return results

    async def close(self) -> None:
        if self._loop_task is not None:
            try:
                await self.write(lambda _: None)  # a barrier: every earlier write is committed
            except StoreUnavailable as err:
                get_logger(component="sqlite", path=self.path).warning(
                    "closing a store that cannot write: its last writes are not kept", error=err.cause
                )
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        with contextlib.suppress(sqlite3.Error):
            self._executor.submit(self._writer.close).result()
        self._executor.shutdown()
        self.reader.close()


class TableLog(Generic[T]):
    """A cursor log kept in one table (`cursor INTEGER PRIMARY KEY AUTOINCREMENT` plus one blob
    column): the launcher's launch events and the reconciler's transitions.

    Owners append inside their write transactions (append()); entries become readable, and
    followers are woken, when the transaction commits. The newest entries are also kept decoded in
    memory, so followers that keep up (the usual case) are served without a query or a decode;
    older cursors are read from the table.

    The oldest entries may be pruned (shepherd.retention): `forget_through` moves the log's start
    before the rows go, so a cursor from before it is refused (CursorOutOfRange) instead of
    silently skipping what was pruned. Cursors are never reused: AUTOINCREMENT remembers the
    highest one even once every row is gone."""

    def __init__(
        self,
        db: Database,
        table: str,
        column: str,
        decode: Callable[[int, bytes], T],
        noun: str,
        *,
        tail: int = 4096,
    ):
        self._db = db
        self.table = table
        self._insert_sql = f"INSERT INTO {table}({column}) VALUES (?)"
        self._read_sql = f"SELECT cursor, {column} FROM {table} WHERE cursor > ? ORDER BY cursor LIMIT ?"
        self._decode = decode
        self._noun = noun
        self._signal = AppendSignal()
        self._head = int(
            db.reader.execute(
                f"SELECT MAX(COALESCE((SELECT MAX(cursor) FROM {table}), 0), "
                "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?), 0))",
                (table,),
            ).fetchone()[0]
        )
        first = db.reader.execute(f"SELECT MIN(cursor) FROM {table}").fetchone()[0]
        # Entries up to `_oldest` are gone (pruned); a reader may resume after it, not before.
        self._oldest = self._head if first is None else int(first) - 1
        self._tail_size = tail
        self._tail: list[tuple[int, T]] = []  # event-loop thread: contiguous cursors, ending at head
        self._staged: list[tuple[int, T]] = []  # writer thread: appended by the open transaction
        db._logs.append(self)

    def append(self, conn: sqlite3.Connection, blob: bytes, item: T) -> int:
        """Writer thread, inside a write: store one entry (`item` decoded, `blob` encoded); returns
        its cursor. `item` must not be modified afterwards: followers are handed it as it is."""
        cursor = int(conn.execute(self._insert_sql, (blob,)).lastrowid or 0)
        self._staged.append((cursor, item))
        return cursor

    def _publish(self, entries: list[tuple[int, T]]) -> None:
        """Event-loop thread, once the transaction that appended `entries` has committed."""
        tail = self._tail
        first = entries[0][0]
        contiguous = entries[-1][0] - first == len(entries) - 1
        if not contiguous or (tail and tail[-1][0] + 1 != first):
            tail.clear()  # never serve a gap from memory; such cursors are read from the table
        if contiguous:
            tail.extend(entries)
            if len(tail) > 2 * self._tail_size:
                del tail[: len(tail) - self._tail_size]
        self._head = max(self._head, entries[-1][0])
        self._signal.notify()

    def head(self) -> int:
        return self._head

    def newest(self) -> int:
        return self._head

    def oldest(self) -> int:
        """The oldest cursor still served: entries up to it were pruned."""
        return self._oldest

    def forget_through(self, cursor: int) -> None:
        """Event-loop thread: entries up to `cursor` are about to be pruned; refuse them from now."""
        if cursor > self._oldest:
            self._oldest = cursor
            self._tail = [entry for entry in self._tail if entry[0] > cursor]

    def read_after(self, cursor: int, limit: int) -> list[tuple[int, T]]:
        if cursor == 0:
            cursor = self._oldest  # "from the oldest retained entry"
        elif cursor < self._oldest:
            raise CursorOutOfRange(
                f"cursor {cursor} is older than the retention: {self._noun}s up to {self._oldest} were "
                f"pruned; the oldest cursor still available is {self._oldest}",
                oldest=self._oldest,
            )
        tail = self._tail
        if tail and tail[0][0] <= cursor + 1:
            start = cursor + 1 - tail[0][0]
            if start <= len(tail):
                return tail[start : start + limit]
        else:
            rows = self._db.reader.execute(self._read_sql, (cursor, limit)).fetchall()
            if rows:
                return [(c, self._decode(c, blob)) for c, blob in rows]
        if cursor > self._head:
            raise CursorOutOfRange(
                f"cursor {cursor} is ahead of the newest {self._noun} {self._head}", oldest=self._oldest
            )
        return []

    async def wait_for_append(self, cursor: int) -> None:
        if self._head > max(cursor, self._oldest):
            return
        await self._signal.wait()
