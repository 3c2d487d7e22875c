"""The DAG of the scheduler-restart test: mapped tasks that hold until the test releases them (an
Airflow Variable, read through the Task SDK), so they are certainly still running while the
scheduler is killed and another adopts them; no fixed duration decides it."""

from __future__ import annotations

import time

from airflow.sdk import DAG, Variable, get_current_context, task

with DAG("shepherd_adoption", schedule=None, catchup=False, default_args={"retries": 0}, tags=["shepherd"]):

    @task
    def hold(i: int) -> int:
        release = f"release_{get_current_context()['run_id']}"
        print(f"holding {i} until the Variable {release} is set", flush=True)
        while Variable.get(release, default=None) is None:
            time.sleep(2)
        print(f"released {i}")
        return i

    hold.expand(i=[0, 1, 2])
