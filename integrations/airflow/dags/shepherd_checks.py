"""The DAG the real-Airflow tests run (tests/integration/test_airflow_deployment.py): tasks that
succeed, a mapped task, a task that fails, is retried and fails again, a task with a pod_override
(resources and an env var it prints), and a task that runs until it is marked failed from Airflow.

It is parsed by the DAG processor on the host and again in every worker pod (the worker image
carries this directory), so it imports nothing but Airflow and the kubernetes client.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from airflow.sdk import DAG, task
from kubernetes.client import models as k8s

GREETING = "hello from the pod_override"
# What the override asks of the pod: an env var the task prints, and resources the task reads back
# from its own cgroup (the memory limit) to show the pod ran with them.
OVERRIDE = k8s.V1Pod(
    spec=k8s.V1PodSpec(
        containers=[
            k8s.V1Container(
                name="base",
                env=[k8s.V1EnvVar(name="SHEPHERD_GREETING", value=GREETING)],
                resources=k8s.V1ResourceRequirements(
                    requests={"cpu": "50m", "memory": "200Mi"}, limits={"memory": "700Mi"}
                ),
            )
        ]
    )
)

with DAG(
    "shepherd_checks",
    schedule=None,
    catchup=False,
    default_args={"retries": 0},
    tags=["shepherd"],
):

    @task
    def hello() -> list[int]:
        print("hello from a Shepherd worker pod")
        return [1, 2]

    @task
    def square(x: int) -> int:
        print(f"square of {x} is {x * x}")
        return x * x

    @task(retries=1, retry_delay=timedelta(seconds=1))
    def flaky() -> None:
        raise RuntimeError("flaky fails on purpose")

    @task(executor_config={"pod_override": OVERRIDE})
    def override() -> None:
        print(f"SHEPHERD_GREETING={os.environ.get('SHEPHERD_GREETING')}")
        # cgroup v2, else v1: the container's own memory limit, as the kubelet set it.
        for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            if Path(path).exists():
                print(f"memory limit={Path(path).read_text().strip()}")
                break

    @task(retries=2)
    def long() -> None:
        # Runs until it is marked failed (or cleared) from Airflow; retries would rerun it, so a
        # single try proves it was not retried.
        while True:
            print("long is still running", flush=True)
            time.sleep(2)

    square.expand(x=hello())
    flaky()
    override()
    long()
