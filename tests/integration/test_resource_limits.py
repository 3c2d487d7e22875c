"""Every bound on what a caller may hold, on the real services: open streams per identity and in
total, the launch rate per identity (with a RetryInfo), the request size; and the plaintext
health port the kubelet probes, which serves health and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane import ClusterInfo
from controlplane.stack import ServiceStack, free_port
from shepherd import channels
from shepherd.errors import retry_delay_s
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import launcher_service_pb2_grpc, reconciler_service_pb2, reconciler_service_pb2_grpc
from tests.helpers import task_key, unique_name

pytestmark = pytest.mark.integration
PER_IDENTITY = 3
TOTAL = 5
BURST = 3


@pytest.fixture(scope="module")
def limited(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    health_port = free_port()
    services = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("limited"),
        executor_id=f"limits-{unique_name('x')[-6:]}",
        flags={
            "reconciler": [
                *("--max-streams-per-identity", str(PER_IDENTITY), "--max-streams", str(TOTAL)),
                *("--health-port", str(health_port)),
            ],
            # One launch a minute after the burst: the refusal cannot expire during the test.
            "launcher": ["--launch-rate", str(1 / 60), "--launch-burst", str(BURST)],
        },
    )
    services.ports["reconciler-health"] = health_port
    services.start()
    yield services
    services.stop_all()


class Streams:
    """WatchTaskStates streams held open by one identity, each known to be admitted once it has
    delivered a message."""

    def __init__(
        self, stack: ServiceStack, identity: str, credentials: channels.ClientCredentials | None = None
    ) -> None:
        self.stack = stack
        self.credentials = credentials or stack.credentials(identity)
        self.calls: list[Any] = []
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Streams:
        self._channel = channels.aio_channel(self.stack.address("reconciler"), self.credentials)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for call in self.calls:
            call.cancel()
        assert self._channel is not None
        await self._channel.close()

    async def open(self) -> Any:
        """Open one more stream and read its first message; raises AioRpcError if refused."""
        assert self._channel is not None
        stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(self._channel)
        call = stub.WatchTaskStates(reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=0))
        self.calls.append(call)
        await asyncio.wait_for(call.read(), 60)
        return call


@pytest.fixture
async def history(limited: ServiceStack) -> None:
    """At least one transition in the reconciler's log, so a new stream from cursor 0 delivers a
    message at once: the barrier that shows it was admitted. Made by an identity of its own,
    with unary calls only, so it holds no stream and uses none of the tests' launches."""
    own = limited.authority.scheduler("limits-history").credentials()
    key = task_key(task_id=unique_name("limits-history"))
    async with channels.aio_channel(limited.address("launcher"), own) as channel:
        await launcher_service_pb2_grpc.LauncherServiceStub(channel).LaunchTask(
            lpb.LaunchTaskRequest(key=key, command=["run"]), timeout=30
        )
    async with channels.aio_channel(limited.address("reconciler"), own) as channel:
        stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(channel)

        async def transitioned() -> None:
            while True:
                try:
                    await stub.GetTask(reconciler_service_pb2.GetTaskRequest(key=key), timeout=10)
                    return
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    await asyncio.sleep(0.1)

        await asyncio.wait_for(transitioned(), 60)


async def test_one_identity_may_hold_only_so_many_streams(limited: ServiceStack, history: None) -> None:
    other = limited.authority.scheduler("second-scheduler").credentials()
    async with Streams(limited, "scheduler") as mine:
        for _ in range(PER_IDENTITY):
            await mine.open()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mine.open()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {PER_IDENTITY} per caller" in (refused.value.details() or "")
        # Another identity is not held back by the first one's streams, up to the total.
        async with Streams(limited, "second-scheduler", other) as theirs:
            for _ in range(TOTAL - PER_IDENTITY):
                await theirs.open()
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await theirs.open()
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"at most {TOTAL})" in (full.value.details() or "")
        # A stream that ends gives its slot back.
        mine.calls.pop(0).cancel()

        async def reopened() -> None:
            while True:
                try:
                    await mine.open()
                    return
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.1)

        await asyncio.wait_for(reopened(), 30)


async def test_launches_beyond_the_rate_are_refused_with_retry_info(limited: ServiceStack) -> None:
    run = unique_name("rate")
    keys = [task_key(task_id=f"{run}-{i}") for i in range(BURST + 1)]
    async with limited.channel("launcher") as channel:
        stub = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        accepted = [
            await stub.LaunchTask(lpb.LaunchTaskRequest(key=k, command=["run"])) for k in keys[:BURST]
        ]
        assert all(not reply.already_existed for reply in accepted)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LaunchTask(lpb.LaunchTaskRequest(key=keys[-1], command=["run"]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        delay = retry_delay_s(refused.value)
        assert delay is not None
        assert delay > 0
        # Refused means not stored: a retry after the delay launches it.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetLaunch(lpb.GetLaunchRequest(key=keys[-1]))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # The limit is per identity: another scheduler still launches.
    other = limited.authority.scheduler("second-scheduler").credentials()
    async with channels.aio_channel(limited.address("launcher"), other) as channel:
        stub = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        reply = await stub.LaunchTask(
            lpb.LaunchTaskRequest(key=task_key(task_id=f"{run}-other"), command=["run"])
        )
        assert not reply.already_existed


async def test_a_request_over_the_size_limit_is_refused(stack: ServiceStack) -> None:
    """The default limit (4 MiB), on the session's stack."""
    key = task_key(task_id=unique_name("huge"))
    padding = "x" * (5 * 1024 * 1024)
    async with stack.channel("launcher") as channel:
        stub = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.LaunchTask(
                lpb.LaunchTaskRequest(key=key, command=["run"], pod_override_yaml=f"# {padding}"), timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetLaunch(lpb.GetLaunchRequest(key=key), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_plaintext_health_port_serves_health_alone(limited: ServiceStack) -> None:
    address = f"127.0.0.1:{limited.ports['reconciler-health']}"
    async with channels.aio_channel(address, channels.PLAINTEXT) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="shepherd.v1.ReconcilerService"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListTasks(reconciler_service_pb2.ListTasksRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
