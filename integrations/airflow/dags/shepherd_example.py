"""The example pipeline `make run AIRFLOW=1` runs (demo/airflow.py): extract a few names, transform
each in its own pod (a mapped task), load the results, while one task fails on purpose; a report
runs whatever happened upstream. Every task prints what it does, so its log has something to show.

Parsed by the DAG processor on the host and again in every worker pod (the worker image carries
this directory), so it imports nothing but Airflow.
"""

from __future__ import annotations

import time

from airflow.sdk import DAG, task

NAMES = ["alpha", "beta", "gamma", "delta"]

with DAG("shepherd_example", schedule=None, catchup=False, tags=["shepherd", "example"]):

    @task
    def extract() -> list[str]:
        print(f"extracted {len(NAMES)} names: {', '.join(NAMES)}")
        return NAMES

    @task
    def transform(name: str) -> int:
        for step in range(1, 4):
            print(f"{name}: step {step} of 3")
            time.sleep(1)
        print(f"{name} has {len(name)} letters")
        return len(name)

    @task
    def load(sizes: list[int]) -> int:
        total = sum(sizes)
        print(f"loaded {len(sizes)} results, {total} letters in all")
        return total

    @task(retries=0)
    def validate() -> None:
        print("checking the upstream feed...")
        raise RuntimeError("the upstream feed is stale: this task fails on purpose (see its log)")

    @task(trigger_rule="all_done")
    def report() -> None:
        print("report: the pipeline finished; see each task's state in the summary")

    [load(transform.expand(name=extract())), validate()] >> report()
