"""Helpers shared by the test suites, so no test file grows its own copy."""

from tests.helpers.eventually import eventually
from tests.helpers.keys import task_key
from tests.helpers.kube import core_api, make_pod, unique_name

__all__ = ["core_api", "eventually", "make_pod", "task_key", "unique_name"]
