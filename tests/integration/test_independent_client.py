"""A scheduler in another language, built from protos/ alone, drives launch -> success and
launch -> failure over mutual TLS with a scheduler's certificate: the contract and a certificate
are enough, nothing of Shepherd's Python code is needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controlplane.stack import ServiceStack
from tests.helpers import unique_name

pytestmark = pytest.mark.integration
CLIENT = Path(__file__).resolve().parents[1] / "clients" / "scheduler.mjs"


def run_node_client(stack: ServiceStack, override: str) -> dict[str, Any]:
    scheduler = stack.identities["scheduler"]
    result = subprocess.run(
        [
            "node",
            str(CLIENT),
            stack.address("launcher"),
            stack.address("reconciler"),
            unique_name("node"),
            override,
            str(scheduler.ca),
            str(scheduler.cert),
            str(scheduler.key),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, f"node client failed ({result.returncode}): {result.stderr}"
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def test_an_independent_client_sees_a_launch_succeed(stack: ServiceStack) -> None:
    outcome = run_node_client(stack, "metadata: {annotations: {sim.shepherd.dev/run-time: 300ms}}")
    assert outcome["states"] == ["TASK_STATE_QUEUED", "TASK_STATE_RUNNING", "TASK_STATE_SUCCEEDED"]


def test_an_independent_client_sees_a_launch_fail_with_details(stack: ServiceStack) -> None:
    outcome = run_node_client(
        stack,
        "metadata: {annotations: {sim.shepherd.dev/outcome: fail, sim.shepherd.dev/exit-code: '4', "
        "sim.shepherd.dev/run-time: 300ms}}",
    )
    assert outcome["states"][-1] == "TASK_STATE_FAILED"
    assert outcome["failure"]["reason"] == "PodFailed"
    assert outcome["failure"]["container"]["exit_code"] == 4
