"""Run the three Shepherd services as real processes against a cluster, each under its own identity.

The demo, the benchmark and the integration tests all use this one runner, so they exercise the
services exactly as `python -m services.<name>` runs them: separate processes, their own
ServiceAccount kubeconfig, talking to each other over gRPC on loopback with mutual TLS and the
default authorization policy, each presenting the certificate the control plane issued it
(controlplane/identities.py). Clients get theirs from `credentials(identity)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.cluster import ClusterInfo
from controlplane.identities import GrpcAuthority, IssuedIdentity
from shepherd import channels
from shepherd.settings import ClientAuth
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
    metrics_ports: dict[str, int] = field(default_factory=dict)  # each service's /metrics (plaintext)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # False: plaintext on loopback with no authentication (the services warn about it).
    secure: bool = True
    # TOKEN: TLS, and every caller (the services too) presents a ServiceAccount token from
    # `token_path(identity)`; the services' own are written from their kubeconfigs at start.
    client_auth: ClientAuth = ClientAuth.CERTIFICATE
    identities: dict[str, IssuedIdentity] = field(default_factory=dict)
    # True: each service gets SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG, set
    # by util-linux's setpriv before it execs the service, so the pid is the service's), so a
    # runner killed with -9 leaves no services behind to attach to the next cluster on the same
    # ports. Only for a runner whose starting thread lives as long as the stack (`shepherd serve`,
    # the benchmark): the kernel ties the signal to that thread, not to the process.
    die_with_parent: bool = False

    def __post_init__(self) -> None:
        if self.secure:
            self.identities = self.authority.ensure()

    @property
    def authority(self) -> GrpcAuthority:
        return GrpcAuthority(Path(self.cluster.state_dir))

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def metrics_url(self, name: str) -> str:
        """Where the service serves its Prometheus metrics."""
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def credentials(self, identity: str = "scheduler") -> channels.ClientCredentials:
        """What a client acting as `identity` presents: a service's name, or "scheduler"."""
        if not self.secure:
            return channels.PLAINTEXT
        if self.client_auth is ClientAuth.TOKEN:
            return channels.ClientCredentials(ca=self.authority.ca, token_file=self.token_path(identity))
        return self.identities[identity].credentials()

    def grpcurl_flags(self, identity: str = "scheduler") -> list[str]:
        """grpcurl's (and, with `--` for `-`, ghz's) flags for calling as `identity`."""
        if not self.secure:
            return ["-plaintext"]
        issued = self.identities[identity]
        return ["-cacert", str(issued.ca), "-cert", str(issued.cert), "-key", str(issued.key)]

    def token_path(self, identity: str) -> Path:
        return self.workdir / f"{identity}.token"

    def _write_service_token(self, name: str) -> None:
        """The bearer token a service presents in token mode: its own ServiceAccount token."""
        doc = yaml.safe_load(Path(self.cluster.kubeconfigs[name]).read_text())
        path = self.token_path(name)
        path.touch(mode=0o600)
        path.write_text(doc["users"][0]["user"]["token"])

    def channel(self, service: str, identity: str = "scheduler") -> grpc.aio.Channel:
        """An asyncio channel to one of the services, as `identity`."""
        return channels.aio_channel(self.address(service), self.credentials(identity))

    @contextlib.asynccontextmanager
    async def scheduler_stubs(
        self,
    ) -> AsyncIterator[
        tuple[
            launcher_service_pb2_grpc.LauncherServiceStub, reconciler_service_pb2_grpc.ReconcilerServiceStub
        ]
    ]:
        """What a scheduler talks to: the launcher and the reconciler, over one channel each."""
        async with self.channel("launcher") as lch, self.channel("reconciler") as rch:
            yield (
                launcher_service_pb2_grpc.LauncherServiceStub(lch),
                reconciler_service_pb2_grpc.ReconcilerServiceStub(rch),
            )

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def command(self, name: str) -> list[str]:
        if name not in self.ports:
            self.ports[name] = free_port()
        if name not in self.metrics_ports:
            self.metrics_ports[name] = free_port()
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
            "--metrics-port",
            str(self.metrics_ports[name]),
        ]
        if not self.log_json:
            argv.append("--no-log-json")
        if self.secure:
            argv += self.identities[name].server_flags()
        if self.secure and self.client_auth is ClientAuth.TOKEN:
            self._write_service_token(name)
            argv += ["--client-auth", "token", "--client-token-file", str(self.token_path(name))]
        if name != "watcher":
            argv += ["--store-path", str(self.workdir / f"{name}.db")]
        if name == "launcher":
            argv += ["--reconciler-address", self.address("reconciler")]
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
        for name in SERVICES:  # each needs the others' addresses
            self.ports.setdefault(name, free_port())
        for name in names:
            log = self.log_path(name).open("ab")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env.get(name, {})}
            self.procs[name] = subprocess.Popen(
                self._orphan_guard() + self.command(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            log.close()
        for name in names if wait else ():
            self.wait_serving(name, timeout=timeout)

    def _orphan_guard(self) -> list[str]:
        setpriv = shutil.which("setpriv") if self.die_with_parent else None
        return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []

    def wait_serving(self, name: str, *, timeout: float = 60.0) -> None:
        self.wait_health(name, health_pb2.HealthCheckResponse.SERVING, timeout=timeout)

    def wait_health(self, name: str, status: int, *, timeout: float = 60.0) -> None:
        """Wait until the service's health check answers `status` (e.g. NOT_SERVING: a launcher
        whose API server is unreachable is up, and says it cannot serve)."""
        deadline = time.monotonic() + timeout
        with channels.sync_channel(self.address(name), self.credentials()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == status:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        wanted = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        raise StackError(f"{name} was not {wanted} within {timeout:.0f}s:\n{self.tail(name)}")

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
