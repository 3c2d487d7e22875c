"""The launcher's health follows the API server: a call refused at the connection level or a
failed probe makes it NOT_SERVING, any answer makes it SERVING again, each change reported once
and in order; a retry waiting out an outage is woken when the API server is back."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp

from shepherd.kube.errors import ApiError
from shepherd.kube.reachability import ApiReachability, is_unreachable


def test_refusals_are_answers_and_silence_is_not() -> None:
    assert is_unreachable(aiohttp.ClientConnectionError("connection refused"))
    assert is_unreachable(TimeoutError())
    assert is_unreachable(ApiError(503, "ServiceUnavailable", "starting"))
    assert not is_unreachable(ApiError(403, "Forbidden", "authorizer warming up"))
    assert not is_unreachable(ApiError(422, "Invalid", "bad pod"))


class _Probe:
    """A /readyz that fails while `down`."""

    def __init__(self) -> None:
        self.down = False

    async def ready(self, *, timeout_s: float) -> None:
        if self.down:
            raise aiohttp.ClientConnectionError("connection refused")


async def _until(predicate: Any) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), 10)


async def test_health_goes_down_with_the_api_server_and_comes_back_by_itself() -> None:
    probe = _Probe()
    reported: list[bool] = []

    async def record(serving: bool) -> None:
        reported.append(serving)

    api = ApiReachability(cast(Any, probe), on_change=record, probe_interval_s=0.01)
    runner = asyncio.create_task(api.run())
    try:
        await _until(lambda: reported == [True])
        api.observe(aiohttp.ClientConnectionError("create refused"))  # a create sees it first
        probe.down = True
        await _until(lambda: reported == [True, False])
        probe.down = False
        await _until(lambda: reported == [True, False, True])
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_retry_waiting_out_an_outage_goes_as_soon_as_the_api_server_is_back() -> None:
    async def ignore(serving: bool) -> None:
        pass

    api = ApiReachability(cast(Any, _Probe()), on_change=ignore)
    api.observe(aiohttp.ClientConnectionError("refused"))
    waiting = asyncio.create_task(api.pause(600))
    await asyncio.sleep(0.01)
    api.observe(None)
    await asyncio.wait_for(waiting, 60)  # woken, not the 600 s backoff
