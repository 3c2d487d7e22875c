"""The supervisor of a service's root tasks: the first failure (a raise, or a return from a task
meant to run forever) stops the service once, naming the task, with health NOT_SERVING."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from shepherd.grpcserver import GrpcServer
from shepherd.settings import ServiceSettings
from shepherd.supervisor import ServiceFailed, Supervisor

H = health_pb2.HealthCheckResponse


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    settings = ServiceSettings(host="127.0.0.1", port=0)  # plaintext on loopback: allowed
    grpc_server = GrpcServer(settings, service_names=["test.Service"])
    await grpc_server.start()
    await grpc_server.set_serving(True)
    yield grpc_server
    await grpc_server.server.stop(None)


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_root_task_that_raises_stops_the_service_once_with_health_not_serving(
    server: GrpcServer,
) -> None:
    statuses: list[int] = []
    trigger = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

        async def follow() -> None:
            async for reply in watch:
                statuses.append(reply.status)

        follower = asyncio.create_task(follow())
        while not statuses:
            await asyncio.sleep(0.01)

        async def fails() -> None:
            await trigger.wait()
            raise RuntimeError("the disk caught fire")

        async def fails_after() -> None:
            await trigger.wait()
            await asyncio.sleep(0)
            raise RuntimeError("a consequence, not the cause")

        supervisor = Supervisor(server)
        with capture_logs() as logs:
            supervisor.spawn(forever(), name="steady")
            supervisor.spawn(fails(), name="doomed")
            supervisor.spawn(fails_after(), name="follower")
            stopping = asyncio.create_task(supervisor.run_until_stopped(0.5))
            trigger.set()
            await stopping
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    assert statuses[0] == H.SERVING
    assert H.NOT_SERVING in statuses
    assert supervisor.failed == "doomed"
    failures = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(failures) == 1
    assert failures[0]["task"] == "doomed"
    assert "the disk caught fire" in failures[0]["error"]
    with pytest.raises(ServiceFailed, match="doomed"):
        supervisor.raise_if_failed()


async def test_a_root_task_that_returns_is_a_failure_unless_it_has_an_end(server: GrpcServer) -> None:
    async def done() -> None:
        return None

    finite = Supervisor(server)
    finite.spawn(done(), name="readiness", finishes=True)
    finite.spawn(forever(), name="steady")
    await asyncio.sleep(0.05)
    assert finite.failed is None

    quitter = Supervisor(server)
    quitter.spawn(done(), name="quitter")
    await quitter.run_until_stopped(0.1)
    assert quitter.failed == "quitter"
    await finite.run_until_stopped(0.1)
    assert finite.failed is None
    finite.raise_if_failed()


async def test_a_failure_inside_a_task_group_is_named_by_its_cause(server: GrpcServer) -> None:
    async def group() -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(forever())
            tasks.create_task(asyncio.sleep(0, result=None))

            async def broken() -> None:
                raise OSError("disk I/O error")

            tasks.create_task(broken())

    supervisor = Supervisor(server)
    with capture_logs() as logs:
        supervisor.spawn(group(), name="workers")
        await supervisor.run_until_stopped(0.1)
    (failure,) = [entry for entry in logs if entry["log_level"] == "error"]
    assert failure["error"] == "OSError: disk I/O error"
