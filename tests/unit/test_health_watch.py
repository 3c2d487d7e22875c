"""The standard health service's Watch works through the request-context interceptor: it writes
its messages with context.write() instead of yielding them, and a wrapper of the wrong kind made
every Watch fail with UNKNOWN."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shepherd.grpcserver import GrpcServer
from shepherd.settings import ServiceSettings


async def test_health_watch_streams_each_status_change() -> None:
    settings = ServiceSettings(host="127.0.0.1", port=0)  # plaintext on loopback: allowed
    server = GrpcServer(settings, service_names=["test.Service"])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            seen = [(await stream.read()).status]
            await server.health.set("", health_pb2.HealthCheckResponse.SERVING)
            seen.append((await stream.read()).status)
            stream.cancel()
    finally:
        await server.server.stop(0)
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
