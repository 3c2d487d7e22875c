"""Subscribing to the launcher's and the watcher's event streams, and never losing our place.

Each consumer resumes from the last cursor it handed to the engine. After a restart the launcher
stream continues from its last committed cursor, while the watcher stream always starts with a
snapshot of current pods (see Engine). When the watcher cannot serve a cursor (it restarted, or
we fell too far behind) it answers OUT_OF_RANGE, and the consumer re-syncs with a snapshot too;
the engine then also notices pods that vanished while nobody was watching.

The launcher has no snapshot to offer: when it answers OUT_OF_RANGE (we were down for longer than
its retention) the consumer goes on from its oldest event, and the engine records the gap. Pods of
the launches in the gap still come through the watcher (the key is on each pod), but a launch
that ended without a pod (failed, cancelled) left no trace but its pruned events. So after a gap,
`recover_launch_outcomes` asks the launcher once about every task still QUEUED without a pod.
"""

from __future__ import annotations

import asyncio

import grpc

from services.reconciler.engine import (
    SOURCE_LAUNCHER,
    SOURCE_WATCHER,
    Engine,
    LaunchItem,
    PodItem,
    SnapshotStart,
)
from services.reconciler.forgotten import LaunchGap
from services.reconciler.launcher_calls import LauncherCalls, LauncherUnavailable
from services.reconciler.metrics import Upstream
from services.reconciler.upstream import UpstreamHealth
from shepherd import channels
from shepherd.kube.client import sleep_backoff
from shepherd.logging import get_logger
from shepherd.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    watcher_service_pb2,
    watcher_service_pb2_grpc,
)


async def consume_launcher(address: str, engine: Engine, health: UpstreamHealth | None = None) -> None:
    log = get_logger(component="launcher-stream", address=address)
    failures = 0
    # Set when our cursor was pruned by the launcher's retention: go on from its oldest event,
    # and tell the engine what was skipped (from this cursor to the first event read).
    gap_after: int | None = None
    async with channels.aio_channel(address) as channel:
        stub = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        while True:
            after = 0 if gap_after is not None else engine.resume_cursor(SOURCE_LAUNCHER)
            try:
                stream = stub.WatchLaunchEvents(
                    launcher_service_pb2.WatchLaunchEventsRequest(after_cursor=after)
                )
                if await _subscribed(stream, health, Upstream.LAUNCHER):
                    log.info("subscribed", after_cursor=after)
                async for response in stream:
                    failures = 0
                    for event in response.events:
                        if gap_after is not None:
                            await engine.submit(LaunchGap(gap_after, event.cursor))
                            gap_after = None
                        await engine.submit(
                            LaunchItem(event.cursor, event.launch),
                            source=SOURCE_LAUNCHER,
                            cursor=event.cursor,
                        )
            except grpc.aio.AioRpcError as err:
                failures += 1
                if health is not None:
                    health.down(Upstream.LAUNCHER)
                if err.code() == grpc.StatusCode.OUT_OF_RANGE and after:
                    # Down for longer than the launcher's retention: the events in between are
                    # gone (see the module's docstring for how their outcomes are recovered).
                    log.error("launch events were pruned before we read them", details=err.details())
                    gap_after = after
                    continue
                log.warning(
                    "launcher stream broke; reconnecting", code=err.code().name, details=err.details()
                )
                await sleep_backoff(failures, cap_s=5.0)


async def consume_watcher(address: str, engine: Engine, health: UpstreamHealth | None = None) -> None:
    log = get_logger(component="watcher-stream", address=address)
    failures = 0
    async with channels.aio_channel(address) as channel:
        stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
        while True:
            after = engine.resume_cursor(SOURCE_WATCHER)
            snapshot = after == 0
            try:
                request = watcher_service_pb2.WatchPodEventsRequest(after_cursor=after, snapshot=snapshot)
                stream = stub.WatchPodEvents(request)
                if await _subscribed(stream, health, Upstream.WATCHER):
                    log.info("subscribed", after_cursor=after, snapshot=snapshot)
                if snapshot:
                    await engine.submit(SnapshotStart())
                async for response in stream:
                    failures = 0
                    engine.watcher_live = True
                    for event in response.events:
                        # Snapshot events share the snapshot's cursor: only its end marks the position.
                        position = (
                            0 if event.type == watcher_service_pb2.POD_EVENT_TYPE_SNAPSHOT else event.cursor
                        )
                        await engine.submit(PodItem(event), source=SOURCE_WATCHER, cursor=position)
            except grpc.aio.AioRpcError as err:
                failures += 1
                engine.watcher_live = False
                if health is not None:
                    health.down(Upstream.WATCHER)
                if err.code() == grpc.StatusCode.OUT_OF_RANGE:
                    log.warning(
                        "the watcher cannot resume our cursor; re-syncing from a snapshot",
                        details=err.details(),
                    )
                    engine.forget_watcher_position()
                    continue
                log.warning("watcher stream broke; reconnecting", code=err.code().name, details=err.details())
                await sleep_backoff(failures, cap_s=5.0)


_GAP_CHECK_BATCH = 32  # GetLaunch calls in flight at once while checking after a gap


async def recover_launch_outcomes(
    engine: Engine, launcher: LauncherCalls, *, batch: int = _GAP_CHECK_BATCH
) -> None:
    """After each gap in the launcher stream, ask the launcher about every task still QUEUED
    without a pod, `batch` at a time: a launch it still has is applied like its events (a failed
    one fails the task); one it no longer has ended without a pod (engine.LaunchLost). Done once
    per gap, and again after a restart that cut it short."""
    log = get_logger(component="launch-gap-check")
    while True:
        await engine.gap_unchecked.wait()
        engine.gap_unchecked.clear()
        gap = engine.gap
        keys = engine.queued_without_pod()
        log.info("checking the tasks a launch-event gap may have left QUEUED", tasks=len(keys), upto=gap.upto)
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            failures = 0
            while True:
                try:
                    answers = await asyncio.gather(*(launcher.get_launch(key) for key in chunk))
                    break
                except LauncherUnavailable as err:
                    failures += 1
                    log.warning("the launcher did not answer; asking again", error=str(err))
                    await sleep_backoff(failures, cap_s=5.0)
            for key, answer in zip(chunk, answers, strict=True):
                if answer is None:
                    await engine.launch_lost(key)
                else:
                    await engine.learn_launch(answer.launch)
        await engine.gap_checked(gap.upto)


async def _subscribed(
    stream: grpc.aio.UnaryStreamCall, health: UpstreamHealth | None, upstream: Upstream
) -> bool:
    """Wait for the stream's headers (the upstreams send them at once), then count it as up;
    whether it is. A refused call ends without headers: the loop's next read raises, and it stays
    down."""
    await stream.initial_metadata()
    if stream.done():
        return False
    if health is not None:
        health.up(upstream)
    return True
