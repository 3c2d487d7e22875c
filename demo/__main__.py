"""`python -m demo`: control plane + three services + a few hundred tasks, with live progress.
`python -m demo --airflow` (`make run AIRFLOW=1`): a real Airflow on Shepherd runs an example DAG."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from controlplane import Cluster
from controlplane.cluster import SERVICE_NAMESPACE
from controlplane.stack import ServiceStack
from demo.workload import REAL_TASKS, Demo


def main() -> int:
    if "--airflow" in sys.argv[1:]:
        from demo import airflow  # Airflow's demo has its own options

        return airflow.main(sys.argv[1:])
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--tasks", type=int, default=300, help="number of tasks to launch (default 300)")
    parser.add_argument("--pending-timeout", default="8", help="seconds before a Pending pod is given up")
    args = parser.parse_args()
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")

    print("== control plane", flush=True)
    info = Cluster().up()
    print(f"kube-apiserver {info.version} at {info.server}")
    workdir = Path(tempfile.mkdtemp(prefix="shepherd-demo-"))
    stack = ServiceStack(
        info,
        workdir,
        executor_id=f"demo-{int(time.time())}",
        flags={"reconciler": ["--pending-timeout-s", args.pending_timeout]},
    )
    print(f"\n== services (logs and stores in {workdir})", flush=True)
    stack.start()
    for name in ("launcher", "watcher", "reconciler"):
        print(f"  {name:<10} {stack.address(name)}  as ServiceAccount {SERVICE_NAMESPACE}/{name}")
    print(f"  worker pods in namespace {info.namespace}")
    print(f"  mutual TLS, default policy; the demo calls as {stack.identities['scheduler'].spiffe_id}")
    if info.real_node:
        real = f" (+{REAL_TASKS} real containers on node {info.real_node})"
    else:
        real = f" (no real node: {info.real_node_unavailable})"
    print(f"\n== demo: {args.tasks} tasks{real}", flush=True)
    try:
        demo = Demo(
            stack.address("launcher"),
            stack.address("reconciler"),
            tasks=args.tasks,
            credentials=stack.credentials("scheduler"),
            real_node=info.real_node is not None,
        )
        unexpected = asyncio.run(demo.run())
    finally:
        stack.stop_all()
    print(f"\nservices stopped; the cluster keeps running (`make cluster-down` stops it). Logs: {workdir}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
