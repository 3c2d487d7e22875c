"""What the reconciler keeps of a finished pod: bounded log tails, bounded recent Events, read only
for pods that need it (a container that ran in a runtime; a failed task), recorded once per pod
beside its action, and a read that hangs never holds the pod's clean-up beyond its bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.reconciler.actions import PodActions
from services.reconciler.collector import PostMortems
from services.reconciler.engine import PendingExpired
from services.reconciler.postmortem import TailBuffer, last_lines, ran_in_a_runtime, recent_events
from services.reconciler.store import PodActionRow, TaskStore
from shepherd import podmeta
from shepherd.podevents import pod_event as raw_pod_event
from shepherd.v1 import task_pb2
from tests.helpers import task_key
from tests.helpers.pods import container, pod_event
from tests.unit.test_reconciler_engine import Harness, running

S = task_pb2
RUNTIME_ID = "containerd://" + "ab" * 32


def ran(**kwargs: Any) -> task_pb2.ContainerStatus:
    status = container(**kwargs)
    status.container_id = RUNTIME_ID
    return status


# ---- pure: tails ------------------------------------------------------------------------------


def test_a_tail_keeps_the_last_lines_within_both_bounds() -> None:
    log = b"".join(b"line %d\n" % i for i in range(1, 1001))
    tail = TailBuffer(max_bytes=1024)
    for i in range(0, len(log), 77):  # chunks cut anywhere, as they come off the wire
        tail.add(log[i : i + 77])
    assert tail.tail(3) == b"line 998\nline 999\nline 1000\n"
    kept = tail.tail(10_000)
    assert len(kept) <= 1024
    assert kept.startswith(b"line ")  # whole lines: the cut one at the front is dropped
    assert kept.endswith(b"line 1000\n")


def test_a_tail_of_one_overlong_line_is_its_last_bytes() -> None:
    tail = TailBuffer(max_bytes=1024)
    tail.add(b"x" * 5000)
    assert tail.tail(100) == b"x" * 1024


def test_last_lines_counts_a_final_line_without_a_newline() -> None:
    assert last_lines(b"a\nb\nc", 2) == b"b\nc"
    assert last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert last_lines(b"a\nb\n", 5) == b"a\nb\n"
    assert last_lines(b"", 5) == b""


# ---- pure: events -----------------------------------------------------------------------------


def _event(name: str, when: str, **fields: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "lastTimestamp": when, "type": "Warning", **fields}


def test_recent_events_are_the_newest_oldest_first_and_bounded() -> None:
    items = [_event(f"e{i}", f"2026-12-01T10:00:{i:02d}Z", reason=f"R{i}") for i in range(30)]
    items.reverse()  # the API lists by name, not by time
    events = recent_events(items, 10)
    assert [e.reason for e in events] == [f"R{i}" for i in range(20, 30)]
    assert recent_events(items, 0) == []


def test_an_event_fits_the_contracts_bounds() -> None:
    raw = {
        "metadata": {"name": "e"},
        "type": "Warning",
        "reason": "Failed",
        "message": "x" * 5000,
        "reportingComponent": "kubelet",
        "series": {"count": 7, "lastObservedTime": "2026-12-01T10:00:00.123456Z"},
        "eventTime": "2026-12-01T09:00:00.000000Z",
    }
    [event] = recent_events([raw, _event("bad", "not a time", reason="Odd")], 1)
    assert (event.reason, event.count, event.source) == ("Failed", 7, "kubelet")
    assert len(event.message) == 1024
    assert event.message.endswith("...")
    assert event.last_time.ToJsonString() == "2026-12-01T10:00:00.123456Z"
    # An Event whose time cannot be read is still reported (first, as the oldest).
    assert [e.reason for e in recent_events([raw, _event("bad", "not a time", reason="Odd")], 5)] == [
        "Odd",
        "Failed",
    ]


# ---- which pods are read ----------------------------------------------------------------------


def test_only_a_container_created_by_a_runtime_has_a_log_to_read() -> None:
    def pod(status: dict[str, Any]) -> dict[str, Any]:
        return {
            "metadata": {"name": "p", "uid": "u"},
            "status": {"phase": "Succeeded", "containerStatuses": [status]},
        }

    real = {"name": "base", "containerID": RUNTIME_ID, "state": {"terminated": {"exitCode": 0}}}
    kwok = {"name": "base", "state": {"terminated": {"exitCode": 0}}}  # kwok's statuses have no id
    assert ran_in_a_runtime(raw_pod_event("MODIFIED", pod(real)))
    assert raw_pod_event("MODIFIED", pod(real)).containers[0].container_id == RUNTIME_ID
    assert not ran_in_a_runtime(raw_pod_event("MODIFIED", pod(kwok)))
    sidecar_only = {**real, "name": "sidecar"}
    assert not ran_in_a_runtime(raw_pod_event("MODIFIED", pod(sidecar_only)))
    long_id = {**real, "containerID": "x" * 1000}
    assert len(raw_pod_event("MODIFIED", pod(long_id)).containers[0].container_id) == 256


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    async with running(store) as h:
        yield h
    await store.close()


async def test_a_finished_pod_that_ran_in_a_runtime_is_read_once_beside_its_action(harness: Harness) -> None:
    ok, bad, kwok = task_key(task_id="ok"), task_key(task_id="bad"), task_key(task_id="kwok")
    done = ran(phase=S.CONTAINER_PHASE_TERMINATED)
    failed = ran(phase=S.CONTAINER_PHASE_TERMINATED, exit_code=3, reason="Error")
    simulated = container(phase=S.CONTAINER_PHASE_TERMINATED)
    await harness.feed(
        pod_event(ok, "Succeeded", uid="u-ok", containers=[done]),
        pod_event(bad, "Failed", uid="u-bad", containers=[failed]),
        pod_event(kwok, "Succeeded", uid="u-kwok", containers=[simulated]),
        # A replayed event of a finished task adds nothing: one action, one read, per pod.
        pod_event(ok, "Succeeded", uid="u-ok", containers=[done]),
    )
    rows = {row.pod_uid: row for row in harness.actions}
    assert len(harness.actions) == 3
    assert (rows["u-ok"].keep_log, rows["u-ok"].read_events) == (True, False)
    assert (rows["u-bad"].keep_log, rows["u-bad"].read_events) == (True, True)
    assert (rows["u-kwok"].keep_log, rows["u-kwok"].read_events) == (False, False)
    assert rows["u-bad"].task_key == podmeta.key_string(bad)
    # Recorded with the action, so a restart that carries the action out again reads it again.
    assert {row.pod_uid: (row.keep_log, row.read_events) for row in harness.store.pending_actions()} == {
        "u-ok": (True, False),
        "u-bad": (True, True),
        "u-kwok": (False, False),
    }


async def test_a_pending_timeout_reads_the_events_of_a_pod_that_never_ran(harness: Harness) -> None:
    key = task_key(task_id="stuck")
    await harness.feed(pod_event(key, "Pending", uid="u-stuck", created=time.time() - 3600))
    await harness.engine.submit(PendingExpired(podmeta.key_string(key), "u-stuck"))
    await harness.settle()
    [row] = [row for row in harness.actions if row.pod_uid == "u-stuck"]
    assert (row.action, row.keep_log, row.read_events) == ("delete", False, True)


async def test_events_go_into_the_failure_details_of_the_pod_they_are_about(harness: Harness) -> None:
    key = task_key(task_id="pull")
    name = podmeta.key_string(key)
    waiting = container(phase=S.CONTAINER_PHASE_WAITING, reason="ErrImagePull", message="not found")
    await harness.feed(pod_event(key, "Pending", uid="u-1", containers=[waiting]))
    transitions = len(harness.states(key))
    pulled = task_pb2.KubernetesEvent(type="Warning", reason="Failed", message="no such image", count=2)
    await harness.engine.failure_events(name, "another-pod", [pulled])
    await harness.settle()
    stored = harness.store.get(name)
    assert stored is not None
    assert list(stored[0].failure.events) == []
    await harness.engine.failure_events(name, "u-1", [pulled])
    await harness.settle()
    stored = harness.store.get(name)
    assert stored is not None
    assert stored[0].state == S.TASK_STATE_FAILED
    assert stored[0].failure.reason == "FatalContainerState"
    assert list(stored[0].failure.events) == [pulled]
    assert len(harness.states(key)) == transitions  # details added, no transition


async def test_kept_tails_are_bounded_in_number(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    try:
        for i in range(5):
            await store.keep_log(f"k{i}", f"u{i}", b"tail %d\n" % i, max_kept=3)
        await store.keep_log("k4", "u4b", b"again\n", max_kept=3)  # a task's newer tail replaces it
        assert [store.kept_log(f"k{i}") for i in range(3)] == [None, None, None]
        assert store.kept_log("k3") == ("u3", b"tail 3\n")
        assert store.kept_log("k4") == ("u4b", b"again\n")
    finally:
        await store.close()


# ---- a read that hangs never holds back the clean-up ------------------------------------------


class HangingKube:
    """A kubelet that never answers a log read; deletes go through."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.event_reads = 0

    async def pod_log(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        await asyncio.Event().wait()
        yield b""

    async def delete_pod(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        self.deleted.append(name)
        return True

    async def pod_events(self, namespace: str, pod_uid: str) -> list[dict[str, Any]]:
        self.event_reads += 1
        raise TimeoutError


async def test_a_log_read_that_hangs_delays_the_delete_only_up_to_its_bound(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    kube: Any = HangingKube()

    async def no_events(*_: Any) -> None:
        raise AssertionError("a failed read hands nothing to the engine")

    def failed_reads() -> float:
        labels = {"read": "log_tail", "outcome": "failed"}
        return REGISTRY.get_sample_value("shepherd_reconciler_post_mortem_reads_total", labels) or 0.0

    before = failed_reads()
    post = PostMortems(kube=kube, store=store, on_events=no_events, timeout_s=0.3, concurrency=1)
    actions = PodActions(kube=kube, store=store, concurrency=4, post_mortems=post)
    runner = asyncio.create_task(actions.run())
    try:
        rows = [
            PodActionRow(f"u{i}", "ns", f"p{i}", "delete", task_key=f"k{i}", keep_log=True, read_events=True)
            for i in range(3)
        ]
        actions.submit(rows)
        started = time.monotonic()
        while len(kube.deleted) < 3 or kube.event_reads < 3:
            await asyncio.sleep(0.05)
            assert time.monotonic() - started < 30, "the deletes waited on the log reads"
        assert sorted(kube.deleted) == ["p0", "p1", "p2"]  # one delete each, nothing kept
        assert post.stats.log_reads_failed == 3
        assert failed_reads() - before == 3  # operators see them too
        assert post.stats.event_reads_failed == 3
        assert [store.kept_log(f"k{i}") for i in range(3)] == [None, None, None]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()
