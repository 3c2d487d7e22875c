"""The three services as processes that faults can kill, and that come back like pods do.

ServiceStack gives the command lines, ports and log files; this keeps the processes, so a
service can be restarted with an environment of its own (a failure point) and its store on a
file system of its own. A keeper restarts any service that exits without being told to, as a
Deployment would, and counts those exits: a crash is worth knowing about even when nothing
was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.stack import SERVICES, ServiceStack, free_port

_RESTART_AFTER_CRASH_S = 1.0


@dataclass(frozen=True)
class Exit:
    at_s: float
    service: str
    returncode: int


@dataclass
class ServiceSet:
    stack: ServiceStack
    store_paths: dict[str, Path]
    started: float = field(default_factory=time.monotonic)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    crashes: list[Exit] = field(default_factory=list)  # exits nobody asked for
    _held: set[str] = field(default_factory=set)  # down on purpose: the keeper leaves them be

    def argv(self, name: str) -> list[str]:
        argv = self.stack.command(name)
        if name in self.store_paths:
            argv[argv.index("--store-path") + 1] = str(self.store_paths[name])
        return argv

    def spawn(self, name: str, env: dict[str, str] | None = None) -> None:
        """Start the service, unless it is running already (two restarts may be due at once)."""
        self._held.discard(name)
        if self.pid(name) is not None:
            return
        self.stack.workdir.mkdir(parents=True, exist_ok=True)
        with self.stack.log_path(name).open("ab") as log:
            self.procs[name] = subprocess.Popen(
                self.argv(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def start_all(self) -> None:
        for name in SERVICES:  # each one's command line names the others' ports
            self.stack.ports.setdefault(name, free_port())
        for name in SERVICES:
            self.spawn(name)

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the service and wait for it to exit; it stays down until `spawn`."""
        self._held.add(name)
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def signal(self, name: str, sig: int) -> None:
        """Send a signal that does not end the process (SIGSTOP, SIGCONT)."""
        pid = self.pid(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def restart_later(self, name: str, delay_s: float, env: dict[str, str] | None = None) -> None:
        await asyncio.sleep(delay_s)
        self.spawn(name, env)

    async def keep_alive(self) -> None:
        """Restart, after a second, any service that exited on its own."""
        while True:
            for name, proc in list(self.procs.items()):
                if name in self._held or proc.poll() is None:
                    continue
                self.crashes.append(Exit(time.monotonic() - self.started, name, proc.returncode))
                self._held.add(name)
                asyncio.get_running_loop().call_later(_RESTART_AFTER_CRASH_S, self._respawn_if_held, name)
            await asyncio.sleep(0.25)

    def _respawn_if_held(self, name: str) -> None:
        proc = self.procs.get(name)
        if name in self._held and (proc is None or proc.poll() is not None):
            self.spawn(name)

    async def wait_serving(self, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        async with self.stack.channel(name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                await asyncio.sleep(0.2)
        return False

    def stop_all(self) -> None:
        for name in reversed(SERVICES):
            self._held.add(name)
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
