"""`shepherd serve`: the three services as one foreground command, for a laptop or a VM.

It reuses the runner the demo and the tests use (controlplane/stack.py), so what an operator
starts is exactly what is tested: three processes, each under its own identity, mutual TLS
between them and towards clients. Against the local control plane (the default) it starts or
reuses that cluster and its per-service ServiceAccounts; against another cluster it gives all
three services the kubeconfig (and context) it is told, and issues certificates from a CA kept
under `--state-dir`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.cluster import Cluster, ClusterInfo
from controlplane.identities import GrpcAuthority
from controlplane.settings import ClusterSettings
from controlplane.stack import SERVICES, ServiceStack
from shepherd_cli.connection import Connection

DEFAULT_PORTS = {"launcher": 50051, "watcher": 50052, "reconciler": 50053}


@dataclass(frozen=True)
class ServeOptions:
    kubeconfig: Path | None
    context: str | None
    namespace: str
    executor_id: str
    ports: dict[str, int]
    workdir: Path
    connection_path: Path
    state_dir: Path


def _cluster(options: ServeOptions, say: Callable[[str], None]) -> ClusterInfo:
    if options.kubeconfig is None:
        # Its own settings (SHEPHERD_CLUSTER_*), so this finds the cluster `make cluster-up` started.
        settings = ClusterSettings()
        say(f"local control plane, state in {settings.state_dir}")
        return Cluster(settings).up()
    kubeconfig = options.kubeconfig
    if options.context:
        kubeconfig = _with_context(options.kubeconfig, options.context, options.workdir)
    path = str(kubeconfig)
    return ClusterInfo(
        server="",
        version="",
        admin_kubeconfig=path,
        kubeconfigs=dict.fromkeys(SERVICES, path),
        namespace=options.namespace,
        state_dir=str(options.state_dir),
    )


def _with_context(kubeconfig: Path, context: str, workdir: Path) -> Path:
    """A copy of the kubeconfig whose current context is `context` (the services read only that)."""
    doc = yaml.safe_load(kubeconfig.read_text())
    names = [entry.get("name") for entry in doc.get("contexts") or []]
    if context not in names:
        raise SystemExit(
            f"error: {kubeconfig} has no context {context!r} (it has: {', '.join(map(str, names))})"
        )
    doc["current-context"] = context
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kubeconfig"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(doc))
    return path


def stack_connection(stack: ServiceStack) -> Connection:
    """What a client needs to reach a running stack as the `scheduler` identity: its addresses,
    metrics URLs and that identity's certificate (what `shepherd serve` writes to its file)."""
    scheduler = stack.authority.scheduler()
    return Connection(
        **{name: stack.address(name) for name in SERVICES},
        **{f"{name}_metrics": stack.metrics_url(name) for name in SERVICES if name in stack.metrics_ports},
        executor_id=stack.executor_id,
        ca=str(scheduler.ca),
        cert=str(scheduler.cert),
        key=str(scheduler.key),
        identity=scheduler.spiffe_id,
    )


def serve(options: ServeOptions, say: Callable[[str], None], *, stop: threading.Event | None = None) -> int:
    """Start the services, publish the connection file, wait for SIGINT/SIGTERM, stop them."""
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = _cluster(options, say)
    stack = ServiceStack(
        cluster,
        options.workdir,
        executor_id=options.executor_id,
        ports=dict(options.ports),
        die_with_parent=True,
    )
    scheduler = GrpcAuthority(Path(cluster.state_dir)).scheduler()
    try:
        say(f"starting launcher, watcher and reconciler (executor {options.executor_id})")
        stack.start()
        stack_connection(stack).write(options.connection_path)
        for name in SERVICES:
            say(f"  {name:<10} {stack.address(name):<22} log {stack.log_path(name)}")
            say(f"  {'':<10} metrics {stack.metrics_url(name)}")
        say(f"scheduler identity {scheduler.spiffe_id}")
        say(f"  --cacert {scheduler.ca} --cert {scheduler.cert} --key {scheduler.key}")
        say(f"connection file {options.connection_path}")
        say("serving; Ctrl-C stops")
        while not stop.is_set():
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    say(f"error: {name} exited with {proc.returncode}:\n{stack.tail(name)}")
                    return 1
            stop.wait(1.0)
        say("stopping")
        return 0
    finally:
        stack.stop_all()
        options.connection_path.unlink(missing_ok=True)
