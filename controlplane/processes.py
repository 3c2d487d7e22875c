"""Start, find and stop the control-plane daemons without leaving anything behind.

Each daemon runs in its own session (so a Ctrl-C in the terminal that started it does not kill
the cluster) and has a pid file beside the command line it was started with. Only those pids are
ever signalled, and only while the process's command line is still exactly that one: a recycled
pid is left alone, and so is any process that merely names our state directory (a user's
`tail -f` of a daemon's log, a tool working in a sibling directory with the same prefix).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ProcessError(RuntimeError):
    """A daemon could not be started; the message says what to do."""


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: Sequence[str]
    port: int | None  # None: the daemon listens on no TCP port (containerd's socket is a file)
    host: str = "127.0.0.1"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _argv(pid: int) -> list[str] | None:
    """The process's command line, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


class Supervisor:
    """Keeps pid files and logs for the daemons of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"
        # Processes started by this object: polled directly, because right after fork the
        # child's /proc cmdline may still be ours, not the daemon's.
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        """The pid of a running daemon we started, or None: the pid file's process, if it still
        runs the command line recorded beside it."""
        try:
            pid = int(self._pidfile(name).read_text())
            argv = json.loads((self.run_dir / f"{name}.json").read_text())["argv"]
        except (OSError, ValueError, KeyError):
            return None
        return pid if _argv(pid) == argv else None

    def start(self, daemon: Daemon) -> int:
        if daemon.port is not None and not port_is_free(daemon.port, daemon.host):
            raise ProcessError(
                f"{daemon.name} cannot start: port {daemon.port} on {daemon.host} is already taken by "
                f"another process. Stop it (see `ss -ltnp 'sport = :{daemon.port}'`) or choose another "
                f"port with the matching SHEPHERD_CLUSTER_*_PORT variable."
            )
        binary = Path(daemon.argv[0])
        if not binary.exists():
            raise ProcessError(f"{daemon.name} binary {binary} is missing: run `make binaries` first.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{daemon.name}.log").open("ab")
        proc = subprocess.Popen(
            list(daemon.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        self._children[daemon.name] = proc
        self._pidfile(daemon.name).write_text(str(proc.pid))
        (self.run_dir / f"{daemon.name}.json").write_text(
            json.dumps({"argv": list(daemon.argv), "port": daemon.port, "host": daemon.host})
        )
        return proc.pid

    def restart(self, name: str, timeout: float = 15.0) -> int:
        """Stop one daemon and start it again with the command line it was started with."""
        self.stop(name, timeout)
        return self.start_again(name, timeout)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """Stop one daemon, leaving the others running; start_again brings it back."""
        pid = self.pid(name)
        if pid is not None:
            _terminate([pid], timeout)

    def start_again(self, name: str, timeout: float = 15.0) -> int:
        """Start a stopped daemon with the command line it was last started with."""
        spec = json.loads((self.run_dir / f"{name}.json").read_text())
        deadline = time.monotonic() + timeout
        host = spec.get("host", "127.0.0.1")
        while (
            spec["port"] is not None and not port_is_free(spec["port"], host) and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        return self.start(Daemon(name, spec["argv"], spec["port"], host))

    def exited_early(self, name: str) -> str | None:
        """If the daemon already died, the tail of its log, so start-up can explain why."""
        child = self._children.get(name)
        alive = child.poll() is None if child is not None else self.pid(name) is not None
        if alive:
            return None
        log = self.log_dir / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        return "\n".join(tail)

    def stop_all(self, order: Sequence[str] = (), timeout: float = 15.0) -> list[int]:
        """Stop every daemon this state directory has a pid file for: those named in `order` one by
        one (clients before the servers they hold connections to, so none waits on the other),
        then any others. SIGTERM first, SIGKILL after `timeout`. Nothing else is touched."""
        names = [*order]
        if self.run_dir.exists():
            names += sorted(p.stem for p in self.run_dir.glob("*.pid") if p.stem not in names)
        stopped: list[int] = []
        for name in names:
            pid = self.pid(name)
            if pid is not None:
                _terminate([pid], timeout)
                stopped.append(pid)
        for child in self._children.values():
            if child.poll() is None:
                child.kill()
            child.wait()
        self._children.clear()
        for pidfile in self.run_dir.glob("*.pid") if self.run_dir.exists() else []:
            pidfile.unlink(missing_ok=True)
        return stopped


def _terminate(pids: list[int], timeout: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
