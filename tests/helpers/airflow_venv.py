"""The Airflow virtualenvs the tests use: built by controlplane/airflowvenv.py (the real Airflow
deployment needs the same one), re-exported here for the executor's tests."""

from controlplane.airflowvenv import AIRFLOW_2, AIRFLOW_3, AirflowVenv, cache_root, ensure

__all__ = ["AIRFLOW_2", "AIRFLOW_3", "AirflowVenv", "cache_root", "ensure"]
