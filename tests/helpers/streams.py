"""Collecting a server stream in the background, so a test can read, disconnect and resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


async def unbatched(stream: AsyncIterator[Any], field_name: str) -> AsyncIterator[Any]:
    """The items of a Watch* stream one by one: each response carries a batch of them."""
    async for response in stream:
        for item in getattr(response, field_name):
            yield item


@dataclass
class Collector(Generic[T]):
    """Appends every item of an async stream to `items` until stopped."""

    stream: AsyncIterator[T]
    items: list[T] = field(default_factory=list)
    error: BaseException | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> Collector[T]:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            async for item in self.stream:
                self.items.append(item)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # kept for the test to assert on
            self.error = err
            self._changed.set()

    async def until(self, predicate: Callable[[list[T]], Any], *, what: str, seconds: float = 60.0) -> None:
        async def wait() -> None:
            while not predicate(self.items):
                if self.error is not None:
                    raise AssertionError(f"stream failed while waiting for {what}: {self.error}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), seconds)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {len(self.items)} items") from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
