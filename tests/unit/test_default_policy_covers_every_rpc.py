"""Every RPC in the contract is callable by someone under the default policy, so a new RPC cannot
ship unreachable (RenderPod once did: every scheduler got PERMISSION_DENIED)."""

from __future__ import annotations

import pytest

from shepherd.authz import Policy, default_policy, spiffe_id
from shepherd.v1 import launcher_service_pb2, reconciler_service_pb2, watcher_service_pb2

METHODS = [
    f"/{service.full_name}/{method.name}"
    for module in (launcher_service_pb2, watcher_service_pb2, reconciler_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
CALLERS = [
    spiffe_id("cluster.local", "schedulers", "airflow"),
    *(spiffe_id("cluster.local", "shepherd", name) for name in ("launcher", "watcher", "reconciler")),
]
# What only Shepherd's own services call; everything else is a scheduler's.
SERVICE_ONLY = {
    "/shepherd.v1.LauncherService/RelaunchTask",
    "/shepherd.v1.LauncherService/CancelLaunch",
    "/shepherd.v1.LauncherService/WatchLaunchEvents",
    "/shepherd.v1.WatcherService/WatchPodEvents",
}


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_has_a_caller(method: str) -> None:
    policy = Policy(default_policy("cluster.local"), open_rpcs=[])
    allowed = [caller for caller in CALLERS if policy.allows(caller, method)]
    assert allowed, f"{method}: nobody may call it under the default policy"
    assert policy.allows(CALLERS[0], method) == (method not in SERVICE_ONLY), method
