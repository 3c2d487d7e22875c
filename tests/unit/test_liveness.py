"""Liveness and readiness are two questions: the kubelet restarts a container whose liveness
probe fails, and only takes a pod out of its Service while its readiness probe fails. A service
that is up but cannot do its job for now (still starting, its store cannot write, the API server
or an upstream stream is gone) must say NOT_SERVING to the readiness probe and go on answering the
liveness probe: a restart would not bring the API server back, it would only lose the queries the
service can still answer and, once started again, wait for the same upstream (CrashLoopBackOff).
Only a service whose root task died (crash-only: shepherd.supervisor) fails its liveness probe.

The health service names asked are the ones deploy/base's probes send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher.server import SERVICE_NAME as LAUNCHER
from services.reconciler.server import SERVICE_NAME as RECONCILER
from services.watcher.server import SERVICE_NAME as WATCHER
from shepherd.grpcserver import GrpcServer
from shepherd.readiness import Readiness
from shepherd.settings import ServiceSettings
from shepherd.supervisor import Supervisor
from tests.helpers.probes import Probe, probed_service

H = health_pb2.HealthCheckResponse
SERVICES = {"launcher": LAUNCHER, "watcher": WATCHER, "reconciler": RECONCILER}


async def _server(proto_service: str) -> GrpcServer:
    settings = ServiceSettings(host="127.0.0.1", port=0)  # plaintext on loopback: allowed
    server = GrpcServer(settings, service_names=[proto_service])
    await server.start()
    return server


@pytest.fixture
async def servers() -> AsyncIterator[list[GrpcServer]]:
    servers: list[GrpcServer] = []
    yield servers
    for server in servers:
        await server.server.stop(None)


async def _check(server: GrpcServer, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.aio.AioRpcError as err:  # NOT_FOUND: a name the server does not know
            return -int(err.code().value[0])
        return int(reply.status)


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_liveness_holds_while_any_readiness_condition_is_unmet(
    name: str, servers: list[GrpcServer]
) -> None:
    live, ready = probed_service(name, Probe.LIVENESS), probed_service(name, Probe.READINESS)
    assert live != ready, f"{name}: liveness and readiness probe the same health service {live!r}"
    server = await _server(SERVICES[name])
    servers.append(server)
    # Still starting: not ready, but alive (a slow first list must not get the container killed).
    assert await _check(server, ready) == H.NOT_SERVING
    assert await _check(server, live) == H.SERVING
    await server.set_serving(True)
    assert await _check(server, ready) == H.SERVING
    for condition in Readiness:
        await server.set_serving(False, condition=condition)
        assert await _check(server, ready) == H.NOT_SERVING, condition
        assert await _check(server, live) == H.SERVING, f"{name}: {condition} unmet fails the liveness probe"
        await server.set_serving(True, condition=condition)
        assert await _check(server, ready) == H.SERVING, condition


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_a_dead_root_task_fails_the_liveness_probe(name: str, servers: list[GrpcServer]) -> None:
    live = probed_service(name, Probe.LIVENESS)
    server = await _server(SERVICES[name])
    servers.append(server)
    await server.set_serving(True)
    statuses: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=live))
        trigger = asyncio.Event()

        async def follow() -> None:
            async for reply in watch:
                statuses.append(reply.status)
                if reply.status == H.SERVING:
                    trigger.set()

        async def dies() -> None:
            await trigger.wait()
            raise RuntimeError("wedged")

        follower = asyncio.create_task(follow())
        supervisor = Supervisor(server)
        supervisor.spawn(dies(), name="doomed")
        stopping = asyncio.create_task(supervisor.run_until_stopped(0.5))
        while H.NOT_SERVING not in statuses and not stopping.done():
            await asyncio.sleep(0.01)
        assert H.NOT_SERVING in statuses
        await stopping
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    assert statuses[0] == H.SERVING
    assert supervisor.failed == "doomed"
