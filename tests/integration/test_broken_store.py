"""A store that cannot write, on real filesystems: a full disk, and an ext4 volume gone read-only
after a disk error. While it cannot write, the service says NOT_SERVING and answers UNAVAILABLE
(retryable, naming the cause and the path, with a RetryInfo); what it had accepted is not lost:
outcomes are written once the store can write again, or replayed by a restart on the repaired
volume. At start, an unusable store ends the process with one line naming the path and the cause.
These tests mount filesystems, so they need root."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.audit import AuditLog
from tests.helpers.gate import Gate, gate_to
from tests.helpers.scheduler import SchedulerClient
from tests.helpers.volumes import ext4_volume, fill, remount, tmpfs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting filesystems needs root"),
]
S = task_pb2
ACCEPTED = 6
SHORT = {"sim.shepherd.dev/run-time": "1s"}
# Pods that are still there when a restarted launcher replays their launches (which settles them
# by the create's 409 AlreadyExists); they are cancelled at the end.
FOREVER = {"sim.shepherd.dev/outcome": "run-forever"}


async def health(stack: ServiceStack, name: str) -> int:
    async with stack.channel(name) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def until_health(stack: ServiceStack, name: str, status: int, *, timeout: float = 60.0) -> None:
    async def wait() -> None:
        while await health(stack, name) != status:
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(
            f"{name} never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        ) from None


def gated_stack(cluster: ClusterInfo, tmp_path: Path, gate: Gate, store_dir: Path) -> ServiceStack:
    """A stack whose launcher keeps its store in `store_dir` and reaches the API server through
    `gate`, retrying creates (every second at most) while the gate is closed."""
    stack = ServiceStack(
        cluster,
        tmp_path / "stack",
        executor_id=f"store-{unique_name('x')[-6:]}",
        flags={
            "launcher": [
                "--kubeconfig",
                gate.kubeconfig(cluster.kubeconfigs["launcher"], tmp_path),
                "--store-path",
                str(store_dir / "launcher.db"),
                "--create-backoff-cap-s",
                "1",
            ]
        },
    )
    return stack


async def accept_while_gate_is_closed(
    client: SchedulerClient, gate: Gate, run: str, life: dict[str, str] = SHORT
) -> list[task_pb2.TaskKey]:
    """Launches the launcher accepts (stored) but cannot create yet."""
    gate.shut()
    keys = [task_key(dag_id="store", task_id=f"t{i}", run_id=run) for i in range(ACCEPTED)]
    replies = await asyncio.gather(*(client.launch(key, annotations=life) for key in keys))
    assert {r.launch.state for r in replies} == {lpb.LAUNCH_STATE_ACCEPTED}
    return keys


async def created_and_reachable(stack: ServiceStack, gate: Gate, keys: list[task_pb2.TaskKey]) -> None:
    """Open the gate; return once the pods exist (audit log) and the launcher has seen the API
    server answer again, so from then on only its store can keep it from SERVING."""
    since = log_size(stack, "launcher")
    gate.open = True
    await AuditLog.from_now(Cluster().audit_log).until_created(*(podmeta.pod_name(k) for k in keys))

    async def answered() -> None:
        while "the Kubernetes API server answers" not in read_log(stack, "launcher", since):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(answered(), 60)


async def refused_as_unavailable(client: SchedulerClient, store: Path, *causes: str) -> None:
    """A new launch is answered UNAVAILABLE, naming the store's path and the cause (one of
    `causes`), with RetryInfo."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.launch(task_key(dag_id="store", task_id=unique_name("refused")))
    err = refused.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    details = err.details() or ""
    assert str(store) in details, details
    assert any(cause in details for cause in causes), details
    status = rpc_status.from_call(err)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details), status
    assert retry.retry_delay.ToTimedelta().total_seconds() > 0


async def check_settled(
    client: SchedulerClient, keys: list[task_pb2.TaskKey], *, cancel: bool = False
) -> None:
    """Every accepted launch gets recorded CREATED and its task ends exactly once (succeeded, or
    revoked if `cancel`), with one pod each."""

    async def recorded(key: task_pb2.TaskKey) -> None:
        while True:
            launch = (await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=key), timeout=10)).launch
            assert launch.state in (lpb.LAUNCH_STATE_ACCEPTED, lpb.LAUNCH_STATE_CREATED), launch
            if launch.state == lpb.LAUNCH_STATE_CREATED:
                return
            await asyncio.sleep(0.2)

    try:
        await asyncio.wait_for(asyncio.gather(*(recorded(key) for key in keys)), 120)
    except TimeoutError:
        raise AssertionError("an accepted launch's outcome was never recorded") from None
    if cancel:
        for key in keys:
            await client.reconciler.CancelTask(rpb.CancelTaskRequest(key=key), timeout=30)
    tasks = await asyncio.gather(*(client.final(key, timeout=120) for key in keys))
    sentinel = task_key(dag_id="store", task_id=unique_name("sentinel"), run_id=keys[0].run_id)
    await client.launch(sentinel, annotations=SHORT)
    await client.final(sentinel, timeout=120)  # barrier: later transitions would have been seen
    assert {t.state for t in tasks} == {S.TASK_STATE_REVOKED if cancel else S.TASK_STATE_SUCCEEDED}
    for key in keys:
        assert sum(s in TERMINAL for s in client.states(key)) == 1, client.states(key)
    pods = {podmeta.pod_name(key) for key in keys}
    created = AuditLog(Cluster().audit_log).creates(pods)
    assert set(created) == pods, created
    assert set(created.values()) == {1}, created


async def test_a_full_disk_makes_the_launcher_unavailable_and_every_outcome_is_written_once_space_returns(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol") as volume:
        async with gate_to(cluster.server) as gate:
            stack = gated_stack(cluster, tmp_path, gate, volume)
            await asyncio.to_thread(stack.start)
            try:
                async with SchedulerClient.connect(stack) as client:
                    keys = await accept_while_gate_is_closed(client, gate, unique_name("full"))
                    ballast = fill(volume)
                    # The pods get created; their outcomes cannot be written.
                    await created_and_reachable(stack, gate, keys)
                    await until_health(stack, "launcher", health_pb2.HealthCheckResponse.NOT_SERVING)
                    await refused_as_unavailable(client, volume / "launcher.db", "database or disk is full")

                    ballast.unlink()
                    await until_health(stack, "launcher", health_pb2.HealthCheckResponse.SERVING)
                    await check_settled(client, keys)
            finally:
                stack.stop_all()


async def test_a_volume_gone_read_only_stops_the_launcher_and_a_restart_on_the_repaired_volume_settles_all(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    with ext4_volume(tmp_path / "ext4") as volume:
        async with gate_to(cluster.server) as gate:
            stack = gated_stack(cluster, tmp_path, gate, volume.path)
            await asyncio.to_thread(stack.start)
            store = volume.path / "launcher.db"
            try:
                async with SchedulerClient.connect(stack) as client:
                    keys = await accept_while_gate_is_closed(client, gate, unique_name("ro"), FOREVER)
                    volume.fail()
                    await created_and_reachable(stack, gate, keys)
                    await until_health(stack, "launcher", health_pb2.HealthCheckResponse.NOT_SERVING)
                    # ext4 reports the emergency read-only state to SQLite as an I/O error.
                    await refused_as_unavailable(
                        client, store, "disk I/O error", "read-only file system", "readonly"
                    )

                    await asyncio.to_thread(stack.stop, "launcher")
                    # Started again on the read-only volume, it does not pretend to serve.
                    since = log_size(stack, "launcher")
                    stack.start(("launcher",), wait=False)
                    assert await stack.exited("launcher") != 0
                    assert_one_line_naming(stack, "launcher", store, since=since)

                    await asyncio.to_thread(volume.repair)
                    await asyncio.to_thread(stack.start, ("launcher",))
                    await check_settled(client, keys, cancel=True)
            finally:
                stack.stop_all()


def log_size(stack: ServiceStack, name: str) -> int:
    path = stack.log_path(name)
    return path.stat().st_size if path.exists() else 0


def read_log(stack: ServiceStack, name: str, since: int = 0) -> str:
    with stack.log_path(name).open("rb") as file:
        file.seek(since)
        return file.read().decode(errors="replace")


def assert_one_line_naming(
    stack: ServiceStack, name: str, store: Path, cause: str = "", *, since: int = 0
) -> None:
    """The service's run whose log starts at `since` ended in one error line naming the store and
    the cause, and no traceback."""
    log = read_log(stack, name, since)
    errors = [line for line in log.splitlines() if '"level":"error"' in line]
    assert len(errors) == 1, log[-3000:]
    assert str(store) in errors[0], errors[0]
    assert cause in errors[0], errors[0]
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(params=["corrupted", "read-only", "full"])
def unusable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A store path that cannot be used, and the cause the service must name."""
    if request.param == "corrupted":
        path = tmp_path / "store.db"
        path.write_bytes(b"this is not a database; " * 200)
        yield path, "file is not a database"
        return
    with tmpfs(tmp_path / "vol", size="2m") as volume:
        path = volume / "store.db"
        if request.param == "read-only":
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
            remount(volume, "ro")
            yield path, "read-only file system"
        else:
            fill(volume)
            yield path, "database or disk is full"


@pytest.mark.parametrize("service", ["launcher", "reconciler"])
async def test_a_store_unusable_at_start_ends_the_service_with_one_line_naming_path_and_cause(
    cluster: ClusterInfo, tmp_path: Path, unusable_store: tuple[Path, str], service: str
) -> None:
    path, cause = unusable_store
    stack = ServiceStack(
        cluster,
        tmp_path / "stack",
        executor_id=f"start-{unique_name('x')[-6:]}",
        flags={service: ["--store-path", str(path)]},
    )
    stack.start((service,), wait=False)
    try:
        assert await stack.exited(service, within_s=30) != 0
    finally:
        stack.stop_all()
    assert_one_line_naming(stack, service, path, cause)


async def test_a_full_disk_stops_the_reconciler_and_its_restart_loses_nothing(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol") as volume:
        store = volume / "reconciler.db"
        stack = ServiceStack(
            cluster,
            tmp_path / "stack",
            executor_id=f"rfull-{unique_name('x')[-6:]}",
            flags={"reconciler": ["--store-path", str(store)]},
        )
        await asyncio.to_thread(stack.start)
        run = unique_name("rfull")
        try:
            async with SchedulerClient.connect(stack) as client:
                before = task_key(dag_id="store", task_id="before", run_id=run)
                await client.launch(before, annotations={"sim.shepherd.dev/run-time": "1s"})
                await client.final(before)
                ballast = fill(volume)
                # Launched onto a full disk: the reconciler cannot commit what it sees, so it stops.
                keys = [task_key(dag_id="store", task_id=f"t{i}", run_id=run) for i in range(ACCEPTED)]
                await asyncio.gather(
                    *(client.launch(k, annotations={"sim.shepherd.dev/run-time": "1s"}) for k in keys)
                )
                assert await stack.exited("reconciler") != 0
                log = stack.log_path("reconciler").read_text()
                failed = [line for line in log.splitlines() if "root task failed" in line]
                assert len(failed) == 1, failed
                assert str(store) in failed[0], failed[0]
                assert "disk is full" in failed[0], failed[0]
                ballast.unlink()
                await asyncio.to_thread(stack.start, ("reconciler",))
                tasks = await asyncio.gather(*(client.final(k, timeout=120) for k in [before, *keys]))
                sentinel = task_key(dag_id="store", task_id="sentinel", run_id=run)
                await client.launch(sentinel, annotations={"sim.shepherd.dev/run-time": "1s"})
                await client.final(sentinel)
                assert {t.state for t in tasks} == {S.TASK_STATE_SUCCEEDED}
                for key in [before, *keys]:
                    assert sum(s in TERMINAL for s in client.states(key)) == 1, client.states(key)
        finally:
            stack.stop_all()
