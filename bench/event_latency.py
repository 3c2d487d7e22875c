"""Latency from a pod status change to the task-state change reaching a WatchTaskStates subscriber.

The benchmark plays the kubelet itself, so it knows when each change happens: tasks are launched
through Shepherd with pods bound to a node no kubelet (or kwok) manages, then their status is
patched Pending -> Running -> Succeeded. Each patch is one pod event and one task transition.

The load is a steady stream, as a busy executor sees it: tasks start at rate/2 per second and each
runs `run_s`, so once the first ones finish, starts and finishes interleave at `rate` events/s and
the reconciler deletes finished pods at rate/2 per second meanwhile. (The first and last `run_s`
are half as busy.) Latency = subscriber receipt - the API server's acknowledgement of the patch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import orjson

from bench.common import admin_kube, percentile, run_changes
from controlplane import ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import (
    launcher_service_pb2,
    task_pb2,
    watcher_service_pb2,
    watcher_service_pb2_grpc,
)

UNMANAGED_NODE = "bench-unmanaged-node"


def _status(phase: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    state: dict[str, Any] = (
        {"running": {"startedAt": now}}
        if phase == "Running"
        else {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
    )
    return {
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "base",
                    "image": "bench",
                    "imageID": "",
                    "ready": phase == "Running",
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
    }


def _plan(
    keys: list[task_pb2.TaskKey], rate: float, run_s: float
) -> list[tuple[float, task_pb2.TaskKey, str, int]]:
    """(offset in seconds, key, phase, state) of every status change, in time order."""
    start_every = 2.0 / rate
    plan = [(i * start_every, k, "Running", task_pb2.TASK_STATE_RUNNING) for i, k in enumerate(keys)]
    plan += [(at + run_s, k, "Succeeded", task_pb2.TASK_STATE_SUCCEEDED) for at, k, _, _ in plan]
    return sorted(plan, key=lambda change: change[0])


async def measure(
    cluster: ClusterInfo, stack: ServiceStack, tasks: int, rate: float, run_s: float = 2.0
) -> dict[str, Any]:
    run = f"latency-{int(time.time())}"
    keys = [
        task_pb2.TaskKey(dag_id="latency", task_id=f"t{i}", run_id=run, try_number=1, map_index=-1)
        for i in range(tasks)
    ]
    sent: dict[tuple[str, int], float] = {}
    committed: dict[tuple[str, int], float] = {}  # the API server acknowledged the change: it happened
    received: dict[tuple[str, int], float] = {}
    sent_wall: dict[tuple[str, int], float] = {}
    applied_wall: dict[
        tuple[str, int], float
    ] = {}  # the transition's change_time: when the reconciler applied it
    committed_wall: dict[tuple[str, int], float] = {}
    observed_wall: dict[tuple[str, int], float] = {}  # the watcher received the change from its watch
    queued = asyncio.Event()
    finished = asyncio.Event()
    queued_count = 0

    async with stack.scheduler_stubs() as (launcher, reconciler):

        async def subscribe() -> None:
            nonlocal queued_count
            async for change, now in run_changes(reconciler, run):
                task = change.task
                name = podmeta.key_string(task.key)
                if task.state == task_pb2.TASK_STATE_QUEUED:
                    queued_count += 1
                    if queued_count == tasks:
                        queued.set()
                received[(name, task.state)] = now
                applied_wall[(name, task.state)] = change.change_time.ToNanoseconds() / 1e9
                if len(received) == 3 * tasks:
                    finished.set()

        async def observe() -> None:
            """The watcher's own receive time of each change: splits the API server's share off."""
            phases = {"Running": task_pb2.TASK_STATE_RUNNING, "Succeeded": task_pb2.TASK_STATE_SUCCEEDED}
            # The watcher serves its stream to the reconciler alone: the benchmark uses its identity.
            async with stack.channel("watcher", identity="reconciler") as channel:
                stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
                async for reply in stub.WatchPodEvents(watcher_service_pb2.WatchPodEventsRequest()):
                    for event in reply.events:
                        state = phases.get(event.phase)
                        if state is not None and event.task_key.run_id == run:
                            observed_wall.setdefault(
                                (podmeta.key_string(event.task_key), state),
                                event.observe_time.ToNanoseconds() / 1e9,
                            )

        subscriber = asyncio.create_task(subscribe())
        observer = asyncio.create_task(observe())
        override = f"spec: {{nodeName: {UNMANAGED_NODE}}}"
        gate = asyncio.Semaphore(32)

        async def launch(key: task_pb2.TaskKey) -> None:
            async with gate:
                await launcher.LaunchTask(
                    launcher_service_pb2.LaunchTaskRequest(
                        key=key, command=["run"], pod_override_yaml=override
                    )
                )

        await asyncio.gather(*(launch(k) for k in keys))
        await asyncio.wait_for(queued.wait(), timeout=300)
        await asyncio.sleep(2)  # let pod creation settle before the measured phase

        # Room for every patch in flight: a patch waiting for a pooled connection after its "sent" time
        # was taken would count client-side queueing as Shepherd latency.
        async with admin_kube(cluster, max_connections=1024) as kube:
            pending: list[asyncio.Task[None]] = []

            async def patch(key: task_pb2.TaskKey, phase: str, state: int) -> None:
                name, change_key = podmeta.pod_name(key), (podmeta.key_string(key), state)
                sent[change_key] = time.monotonic()
                sent_wall[change_key] = time.time()
                await kube._request(
                    "PATCH",
                    f"/api/v1/namespaces/{cluster.namespace}/pods/{name}/status",
                    body=orjson.dumps(_status(phase)),
                    content_type="application/merge-patch+json",
                )
                committed[change_key] = time.monotonic()
                committed_wall[change_key] = time.time()

            plan = _plan(keys, rate, run_s)
            start = time.monotonic()
            for offset, key, phase, state in plan:
                delay = start + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(patch(key, phase, state)))
            await asyncio.gather(*pending)
            achieved = len(plan) / (time.monotonic() - start)
            # The interleaved middle, where starts and finishes both arrive, as actually sent.
            steady = sorted(
                sent[(podmeta.key_string(key), state)]
                for offset, key, _, state in plan
                if run_s <= offset <= plan[-1][0] - run_s
            )
            steady_rate = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else achieved
            try:
                await asyncio.wait_for(finished.wait(), timeout=120)
            except TimeoutError:
                raise TimeoutError(
                    f"only {len(received)} of {3 * tasks} transitions reached the subscriber; "
                    f"observer failed: {observer.done() and observer.exception()}"
                ) from None
            subscriber.cancel()
            observer.cancel()
            await asyncio.gather(subscriber, observer, return_exceptions=True)
    latencies = [(received[k] - sent[k]) * 1000 for k in sent]
    # The pod's status changes when the API server commits the patch, so the headline starts at its
    # acknowledgement; timing from the send would add the API server's own queueing of the patch.
    from_change = [(received[k] - committed[k]) * 1000 for k in committed]
    to_applied = [(applied_wall[k] - sent_wall[k]) * 1000 for k in sent]
    to_subscriber = [lat - first for lat, first in zip(latencies, to_applied, strict=True)]
    # The legs after the acknowledgement: the API server delivering the change to the watcher's
    # watch, then the watcher -> reconciler pipeline until the transition is applied.
    to_watcher = [(observed_wall[k] - committed_wall[k]) * 1000 for k in committed_wall if k in observed_wall]
    watcher_to_applied = [
        (applied_wall[k] - observed_wall[k]) * 1000 for k in observed_wall if k in applied_wall
    ]
    return {
        "events": len(latencies),
        "target_rate": rate,
        "achieved_rate": round(achieved, 1),
        "steady_rate": round(steady_rate, 1),
        "task_run_s": run_s,
        "p50_ms": round(percentile(from_change, 50), 1),
        "p99_ms": round(percentile(from_change, 99), 1),
        "max_ms": round(max(from_change), 1),
        "from_send_p50_ms": round(percentile(latencies, 50), 1),
        "from_send_p99_ms": round(percentile(latencies, 99), 1),
        "patch_to_applied_p50_ms": round(percentile(to_applied, 50), 1),
        "patch_to_applied_p99_ms": round(percentile(to_applied, 99), 1),
        "ack_to_watcher_p50_ms": round(percentile(to_watcher, 50), 1),
        "ack_to_watcher_p99_ms": round(percentile(to_watcher, 99), 1),
        "watcher_to_applied_p50_ms": round(percentile(watcher_to_applied, 50), 1),
        "watcher_to_applied_p99_ms": round(percentile(watcher_to_applied, 99), 1),
        "applied_to_subscriber_p50_ms": round(percentile(to_subscriber, 50), 1),
        "applied_to_subscriber_p99_ms": round(percentile(to_subscriber, 99), 1),
    }
