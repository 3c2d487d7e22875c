"""Cursor-addressed event logs and the one loop that streams them to gRPC subscribers.

All three services expose an ordered log that clients read "after cursor N": the watcher's
pod events (in memory, rebuilt from the API server after a restart), the launcher's launch
outcomes and the reconciler's task transitions (both durable in SQLite). `follow` is the
shared reader: it replays what is retained after the cursor, then waits for appends, so a
reconnecting client gets every later event exactly once. It hands out batches: with grpc.aio a
stream message costs tens of microseconds of CPU on each side, far more than a small event.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_SEQ_BITS = 32
# Under load a subscriber gets at most one message per interval, carrying every entry appended
# meanwhile; when entries are sparser than that, each goes out at once, with no added delay.
# Measured on the 2-core machine with 6,000 pods (scheduler and kwok running, until every pod was
# Running): the three services used 1.7-1.9 ms of CPU per pod at 5 ms, 1.4-1.5 at 15 ms and
# 1.3 at 25 ms. Every message wakes a sender and a receiver, and a wake-up costs tens of
# microseconds there; the events themselves are cheap.
MESSAGE_INTERVAL_S = 0.025


class CursorOutOfRange(Exception):
    """The cursor is not served by this log (too old, from an earlier run, or in the future).
    `oldest` is the oldest cursor the log still serves: resuming after it misses nothing retained."""

    def __init__(self, message: str, *, oldest: int) -> None:
        super().__init__(message)
        self.oldest = oldest


class CursorLog(Protocol[T_co]):
    def read_after(self, cursor: int, limit: int) -> Sequence[tuple[int, T_co]]:
        """Entries with cursor > `cursor`, oldest first, at most `limit`. Raises CursorOutOfRange."""
        ...

    def newest(self) -> int:
        """Cursor of the newest entry readable now: following after it gets only later entries."""
        ...

    async def wait_for_append(self, cursor: int) -> None:
        """Return once an entry with a cursor greater than `cursor` may exist."""
        ...


class AppendSignal:
    """Wakes every waiter on each append; waiters re-check the log, so no wake-up is lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class MemoryLog(Generic[T]):
    """A bounded in-memory log. Cursors are (run epoch << 32 | sequence), so they keep growing across
    restarts and a cursor from an earlier run is recognisable and refused."""

    def __init__(self, retention: int, epoch: int | None = None) -> None:
        self.epoch = int(time.time()) if epoch is None else epoch
        self._base = self.epoch << _SEQ_BITS
        self._entries: deque[T] = deque(maxlen=retention)
        self._next_seq = 1  # sequence of the next append
        self._signal = AppendSignal()

    @property
    def head(self) -> int:
        """Cursor of the newest entry (or of the run's start when empty)."""
        return self._base + self._next_seq - 1

    def newest(self) -> int:
        return self.head

    @property
    def next_cursor(self) -> int:
        """The cursor the next append gets: for an entry that carries its own cursor."""
        return self._base + self._next_seq

    def append(self, item: T) -> int:
        self._entries.append(item)
        cursor = self._base + self._next_seq
        self._next_seq += 1
        self._signal.notify()
        return cursor

    def _oldest_position(self, cursor: int) -> int:
        """Cursor 0 means "from the oldest retained entry": the position just before it."""
        return self._base + self._next_seq - 1 - len(self._entries) if cursor == 0 else cursor

    def read_after(self, cursor: int, limit: int) -> list[tuple[int, T]]:
        cursor = self._oldest_position(cursor)
        first_seq = self._next_seq - len(self._entries)
        oldest = self._base + first_seq - 1
        if cursor >> _SEQ_BITS != self.epoch:
            raise CursorOutOfRange(
                f"cursor {cursor} is from another run of this log (this run is {self.epoch}; the "
                f"oldest cursor still available is {oldest}); re-sync with a snapshot",
                oldest=oldest,
            )
        seq = cursor - self._base
        if seq > self._next_seq - 1:
            raise CursorOutOfRange(f"cursor {cursor} is ahead of the newest event {self.head}", oldest=oldest)
        if seq < first_seq - 1:
            raise CursorOutOfRange(
                f"cursor {cursor} is older than the retained events (the oldest cursor still "
                f"available is {oldest}); re-sync with a snapshot",
                oldest=oldest,
            )
        start = seq - first_seq + 1
        stop = min(len(self._entries), start + limit)
        return [(self._base + first_seq + i, self._entries[i]) for i in range(start, stop)]

    async def wait_for_append(self, cursor: int) -> None:
        # Without the translation, cursor 0 on an empty log is always "behind the head" and a
        # follower would spin without ever yielding the event loop.
        if self._oldest_position(cursor) < self.head:
            return
        await self._signal.wait()


async def follow(
    log: CursorLog[T], after: int, *, batch: int = 256, interval_s: float = MESSAGE_INTERVAL_S
) -> AsyncIterator[Sequence[tuple[int, T]]]:
    """Every entry after `after`, then new ones as they are appended, forever: in batches of
    whatever is already there (at most `batch`). A subscriber that is behind gets a stream message
    per batch, not per entry; one that keeps up gets a sparse entry at once, and under a steady
    stream of entries at most one message per `interval_s`, so a burst of N appends costs a few
    messages instead of N."""
    sent = 0.0  # when the last partial batch went out; full batches (a backlog) are not paced
    while True:
        if (pause := sent + interval_s - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        entries = log.read_after(after, batch)
        if entries:
            yield entries
            after = entries[-1][0]
            sent = time.monotonic() if len(entries) < batch else 0.0
        else:
            await log.wait_for_append(after)
