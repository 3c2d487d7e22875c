"""What every service offers a platform team: reflection for grpcurl and ghz, health that means
ready, request ids in the logs, a graceful drain on SIGTERM, and a port that cannot be bound
ending the service with one line that names it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane import ClusterInfo
from controlplane.settings import ClusterSettings
from controlplane.stack import SERVICES, ServiceStack
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import (
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    reconciler_service_pb2_grpc,
    watcher_service_pb2,
    watcher_service_pb2_grpc,
)
from tests.helpers import task_key, unique_name
from tests.helpers.cluster import unreachable_kubeconfig
from tests.helpers.probes import Probe, probed_service

pytestmark = pytest.mark.integration
GRPCURL = str(ClusterSettings().bin_dir / "grpcurl")


@pytest.mark.parametrize("name", SERVICES)
def test_grpcurl_discovers_each_service_by_reflection(stack: ServiceStack, name: str) -> None:
    listed = subprocess.run(
        [GRPCURL, *stack.grpcurl_flags(), stack.address(name), "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert f"shepherd.v1.{name.capitalize()}Service" in listed
    assert "grpc.health.v1.Health" in listed


@pytest.mark.parametrize("name", SERVICES)
def test_methods_resolve_by_reflection_as_ghz_needs(stack: ServiceStack, name: str) -> None:
    service = f"shepherd.v1.{name.capitalize()}Service"
    methods = [
        line.split()[1]
        for line in subprocess.run(
            [GRPCURL, *stack.grpcurl_flags(), stack.address(name), "describe", service],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        if line.strip().startswith("rpc ")
    ]
    assert methods
    for method in methods:
        out = subprocess.run(
            [GRPCURL, *stack.grpcurl_flags(), stack.address(name), "describe", f"{service}.{method}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "is a method" in out


def test_grpcurl_can_call_an_rpc_without_proto_files(stack: ServiceStack) -> None:
    body = json.dumps({"page_size": 1})
    out = subprocess.run(
        [
            GRPCURL,
            *stack.grpcurl_flags(),
            "-d",
            body,
            stack.address("reconciler"),
            "shepherd.v1.ReconcilerService/ListTasks",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.returncode == 0


async def test_the_watcher_is_not_serving_until_its_first_list(cluster: ClusterInfo, tmp_path: Path) -> None:
    stack = ServiceStack(
        cluster,
        tmp_path,
        executor_id="never-listed",
        flags={"watcher": ["--kubeconfig", unreachable_kubeconfig(cluster.kubeconfigs["watcher"], tmp_path)]},
    )
    stack.start(("watcher",), wait=False)  # its API server is unreachable: the first list never completes
    try:
        async with stack.channel("watcher", identity="reconciler") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="shepherd.v1.WatcherService")
            reply = await health.Check(request, wait_for_ready=True, timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Not ready, but alive: a restart would not make the API server reachable.
            liveness = health_pb2.HealthCheckRequest(service=probed_service("watcher", Probe.LIVENESS))
            reply = await health.Check(liveness, timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.WatchPodEvents(watcher_service_pb2.WatchPodEventsRequest()):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop_all()


async def test_request_ids_are_echoed_and_bound_into_log_lines(stack: ServiceStack) -> None:
    key = task_key(task_id=unique_name("rid"))
    async with stack.channel("launcher") as channel:
        stub = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        call = stub.LaunchTask(
            lpb.LaunchTaskRequest(key=key, command=["run"]), metadata=(("x-request-id", "req-abc-123"),)
        )
        reply = await call
        trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "req-abc-123"
    lines = [json.loads(line) for line in stack.tail("launcher", 500).splitlines() if line.startswith("{")]
    accepted = next(
        line
        for line in lines
        if line.get("event") == "launch accepted" and line.get("pod") == reply.launch.pod_name
    )
    assert accepted["request_id"] == "req-abc-123"
    assert accepted["rpc"] == "/shepherd.v1.LauncherService/LaunchTask"
    assert accepted["task_key"].startswith(f"etl_daily/{key.task_id}/")


async def test_sigterm_drains_a_service_and_it_exits_cleanly(cluster: ClusterInfo, tmp_path: Path) -> None:
    stack = ServiceStack(cluster, tmp_path, executor_id=f"drain-{unique_name('x')[-6:]}")
    stack.start()
    try:
        async with stack.channel("reconciler") as channel:
            stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(channel)
            stream = stub.WatchTaskStates(reconciler_service_pb2.WatchTaskStatesRequest())
            code = stack.stop("reconciler", sig=signal.SIGTERM)
            assert code == 0
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stream:
                    pass
        log = stack.tail("reconciler", 50)
        assert "draining" in log
        assert '"stopped"' in log
    finally:
        stack.stop_all()


@pytest.mark.parametrize("setting", ["metrics_port", "health_port"])
async def test_a_port_in_use_ends_the_service_with_one_line_naming_it(
    cluster: ClusterInfo, tmp_path: Path, setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = ServiceStack(cluster, tmp_path, executor_id=f"port-{unique_name('x')[-6:]}")
        if setting == "metrics_port":
            stack.metrics_ports["watcher"] = port
        else:
            stack.flags["watcher"] = ["--health-port", str(port)]
        stack.start(("watcher",), wait=False)
        try:
            assert await stack.exited("watcher", within_s=60) != 0
        finally:
            stack.stop_all()
    log = stack.log_path("watcher").read_text()
    errors = [line for line in log.splitlines() if '"level":"error"' in line]
    assert len(errors) == 1, log[-3000:]
    assert setting in errors[0], errors[0]
    assert str(port) in errors[0], errors[0]
    assert "Traceback" not in log, log[-3000:]
