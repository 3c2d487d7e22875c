"""Shepherd for Apache Airflow: an executor that runs task instances as Shepherd tasks.

`[core] executor = shepherd_airflow.ShepherdExecutor`. The class is imported on first use, so
the pure parts of the package (translate, config) load without Airflow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShepherdExecutor"]


def __getattr__(name: str) -> Any:
    if name == "ShepherdExecutor":
        from shepherd_airflow.executor import ShepherdExecutor

        return ShepherdExecutor
    raise AttributeError(name)
