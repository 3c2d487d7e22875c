"""Run the three Shepherd services as real processes against a cluster, each under its own identity.

The demo, the benchmark and the integration tests all use this one runner, so they exercise the
services exactly as `python -m services.<name>` runs them: separate processes, their own
ServiceAccount kubeconfig, talking to each other over gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.cluster import ClusterInfo
from shepherd import channels
from shepherd.v1 import launcher_service_pb2_grpc, reconciler_service_pb2_grpc

SERVICES = ("launcher", "watcher", "reconciler")


class StackError(RuntimeError):
    """A service did not come up; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceStack:
    cluster: ClusterInfo
    workdir: Path
    executor_id: str = "shepherd"
    flags: dict[str, list[str]] = field(default_factory=dict)  # extra flags per service
    env: dict[str, dict[str, str]] = field(default_factory=dict)  # extra environment per service
    log_json: bool = True
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @contextlib.asynccontextmanager
    async def scheduler_stubs(
        self,
    ) -> AsyncIterator[
        tuple[
            launcher_service_pb2_grpc.LauncherServiceStub, reconciler_service_pb2_grpc.ReconcilerServiceStub
        ]
    ]:
        """What a scheduler talks to: the launcher and the reconciler, over one channel each."""
        async with (
            channels.aio_channel(self.address("launcher")) as lch,
            channels.aio_channel(self.address("reconciler")) as rch,
        ):
            yield (
                launcher_service_pb2_grpc.LauncherServiceStub(lch),
                reconciler_service_pb2_grpc.ReconcilerServiceStub(rch),
            )

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def command(self, name: str) -> list[str]:
        if name not in self.ports:
            self.ports[name] = free_port()
        argv = [
            sys.executable,
            "-m",
            f"services.{name}",
            "--port",
            str(self.ports[name]),
            "--host",
            "127.0.0.1",
            "--kubeconfig",
            self.cluster.kubeconfigs[name],
            "--executor-id",
            self.executor_id,
            "--namespace",
            self.cluster.namespace,
        ]
        if not self.log_json:
            argv.append("--no-log-json")
        if name != "watcher":
            argv += ["--store-path", str(self.workdir / f"{name}.db")]
        if name == "reconciler":
            argv += [
                "--launcher-address",
                self.address("launcher"),
                "--watcher-address",
                self.address("watcher"),
            ]
        return argv + self.flags.get(name, [])

    def start(self, names: tuple[str, ...] = SERVICES, *, timeout: float = 60.0, wait: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("launcher", "watcher"):  # the reconciler needs their addresses
            self.ports.setdefault(name, free_port())
        for name in names:
            log = self.log_path(name).open("ab")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env.get(name, {})}
            self.procs[name] = subprocess.Popen(
                self.command(name), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            log.close()
        for name in names if wait else ():
            self.wait_serving(name, timeout=timeout)

    def wait_serving(self, name: str, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with channels.sync_channel(self.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise StackError(f"{name} was not SERVING within {timeout:.0f}s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_path(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, name: str, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    async def exited(self, name: str, *, within_s: float = 60.0) -> int:
        """Wait (without blocking the event loop) until the service exits by itself; its exit code.
        StackError if it is still running after `within_s`."""
        proc = self.procs[name]
        deadline = time.monotonic() + within_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise StackError(f"{name} was still running after {within_s:.0f}s:\n{self.tail(name)}")
            await asyncio.sleep(0.1)
        del self.procs[name]
        return proc.returncode

    def restart(self, name: str, *, sig: int = signal.SIGTERM, env: dict[str, str] | None = None) -> None:
        """Stop the service and start it again, with `env` (if given) as its extra environment."""
        self.stop(name, sig=sig)
        if env is not None:
            self.env[name] = env
        self.start((name,))

    def stop_all(self) -> None:
        for name in reversed(SERVICES):
            self.stop(name)
