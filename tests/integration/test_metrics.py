"""Each service's /metrics, read live from a running stack: the counters and histograms move as a
few tasks go through, every metric the Grafana dashboard uses exists, and the reconciler's health
and metrics tell the truth when it loses an upstream stream, and recover by themselves."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane import ClusterInfo
from controlplane.stack import SERVICES, ServiceStack
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import task_pb2
from shepherd.v1.launcher_service_pb2_grpc import LauncherServiceStub
from shepherd_cli.main import cli
from shepherd_cli.serve import stack_connection
from tests.helpers import task_key, unique_name
from tests.helpers.eventually import eventually_async
from tests.helpers.metrics import Scrape, scrape
from tests.helpers.probes import Probe, probed_service
from tests.helpers.scheduler import SchedulerClient
from tests.helpers.streams import Collector

pytestmark = pytest.mark.integration
S = task_pb2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "grafana-dashboard.json"
LOSS_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def metrics_stack(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """A stack of its own: one test stops its watcher."""
    stack = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("metrics"),
        executor_id=f"metrics-{uuid.uuid4().hex[:8]}",
        flags={"reconciler": ["--upstream-loss-timeout-s", str(LOSS_TIMEOUT_S)]},
    )
    stack.start()
    yield stack
    stack.stop_all()


async def _scrape_all(stack: ServiceStack) -> dict[str, Scrape]:
    return {name: await scrape(stack.metrics_url(name)) for name in SERVICES}


async def _subscribed(stack: ServiceStack) -> None:
    """Until the reconciler follows both upstream streams (its launcher stream may still be in a
    reconnect backoff from a start before the launcher listened)."""

    async def both() -> bool:
        reconciler = await scrape(stack.metrics_url("reconciler"))
        connected = "shepherd_reconciler_upstream_connected"
        return all(reconciler.value(connected, upstream=u) == 1 for u in ("launcher", "watcher"))

    await eventually_async(both, what="the reconciler subscribed to the launcher and the watcher")


async def test_counters_and_histograms_move_as_tasks_go_through(metrics_stack: ServiceStack) -> None:
    stack = metrics_stack
    await _subscribed(stack)
    before = await _scrape_all(stack)
    run = unique_name("metrics")
    ok = [task_key(dag_id="metrics", task_id=f"ok{i}", run_id=run) for i in range(3)]
    bad = task_key(dag_id="metrics", task_id="fail", run_id=run)
    async with SchedulerClient.connect(stack) as client:
        for key in ok:
            await client.launch(key, annotations={"sim.shepherd.dev/run-time": "300ms"})
        await client.launch(
            bad, annotations={"sim.shepherd.dev/outcome": "fail", "sim.shepherd.dev/run-time": "300ms"}
        )
        again = await client.launch(ok[0], annotations={"sim.shepherd.dev/run-time": "300ms"})
        assert again.already_existed
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.launcher.LaunchTask(lpb.LaunchTaskRequest(command=["run-task"]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        async with stack.channel("launcher", identity="watcher") as channel:  # not allowed to launch
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await LauncherServiceStub(channel).LaunchTask(
                    lpb.LaunchTaskRequest(key=task_key(task_id="denied", run_id=run), command=["run-task"]),
                    timeout=30,
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finals = [await client.final(key) for key in [*ok, bad]]
        assert [t.state for t in finals] == [S.TASK_STATE_SUCCEEDED] * 3 + [S.TASK_STATE_FAILED]

        async def actions_done() -> dict[str, Scrape] | None:
            # Succeeded pods are deleted, the failed one kept and marked done: both after the
            # terminal transition, so they are waited for.
            now = await _scrape_all(stack)
            r, r0 = now["reconciler"], before["reconciler"]
            name = "shepherd_reconciler_pod_actions_total"
            deleted = sum(
                r.value(name, action="delete", outcome=o) - r0.value(name, action="delete", outcome=o)
                for o in ("done", "already_gone")
            )
            marked = r.value(name, action="mark_done", outcome="done") - r0.value(
                name, action="mark_done", outcome="done"
            )
            return now if deleted >= 3 and marked >= 1 else None

        after = await eventually_async(actions_done, what="pod actions counted")
        subscribed = after["reconciler"].value("shepherd_stream_subscribers", stream="task_states")
        assert subscribed >= 1  # this client's WatchTaskStates

    def delta(service: str, name: str, **labels: str) -> float:
        return after[service].value(name, **labels) - before[service].value(name, **labels)

    launches = "shepherd_launcher_launches_total"
    assert delta("launcher", launches, outcome="accepted") == 4
    assert delta("launcher", launches, outcome="already_existed") == 1
    assert delta("launcher", launches, outcome="invalid") == 1
    assert delta("launcher", "shepherd_rpc_refused_total", reason="permission_denied") == 1
    assert delta("launcher", "shepherd_launcher_pod_creates_total", outcome="created") == 4
    assert delta("launcher", "shepherd_launcher_pod_create_duration_seconds_count") >= 4
    assert delta("launcher", "shepherd_sqlite_commit_duration_seconds_count") >= 1
    assert after["launcher"].value("shepherd_launcher_backlog_launches") == 0
    assert after["launcher"].value("shepherd_stream_subscribers", stream="launch_events") >= 1

    events = "shepherd_watcher_pod_events_total"
    assert delta("watcher", events, type="added", synthetic="false") >= 4
    assert delta("watcher", events, type="modified", synthetic="false") >= 4
    assert delta("watcher", "shepherd_watcher_event_lag_seconds_count") >= 4
    assert after["watcher"].value("shepherd_stream_subscribers", stream="pod_events") >= 1
    assert "shepherd_sqlite_writable" not in after["watcher"].names()  # it has no store
    assert after["launcher"].value("shepherd_sqlite_writable") == 1

    transitions = "shepherd_reconciler_transitions_total"
    assert delta("reconciler", transitions, state="queued") == 4
    assert delta("reconciler", transitions, state="succeeded") == 3
    assert delta("reconciler", transitions, state="failed") == 1
    assert delta("reconciler", transitions, state="running") == delta(
        "reconciler", "shepherd_reconciler_state_duration_seconds_count", state="running"
    )
    # Every task left QUEUED once: its time there is observed once.
    assert delta("reconciler", "shepherd_reconciler_state_duration_seconds_count", state="queued") == 4
    assert delta("reconciler", "shepherd_sqlite_commit_duration_seconds_count") >= 1

    for name in SERVICES:
        assert after[name].value("shepherd_serving") == 1, name
        for condition in ("started", "store", "api", "upstream"):
            assert after[name].value("shepherd_health_condition_unmet", condition=condition) == 0


async def test_every_metric_the_dashboard_uses_is_served(metrics_stack: ServiceStack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\b(shepherd_[a-z0-9_]+|process_[a-z0-9_]+)\b", target["expr"])
    }
    assert used, "the dashboard queries no metric"
    served: set[str] = set()
    for name in SERVICES:
        served |= (await scrape(metrics_stack.metrics_url(name))).names()
    assert sorted(used - served) == []


def _status(stack: ServiceStack, tmp_path: Path) -> dict[str, Any]:
    """`shepherd status -o json` with a connection file naming this stack."""
    path = tmp_path / "connection.json"
    stack_connection(stack).write(path)
    runner = CliRunner(env={"COLUMNS": "250"})
    table = runner.invoke(cli, ["--connection", str(path), "status"])
    result = runner.invoke(cli, ["--connection", str(path), "status", "-o", "json"])
    assert result.exit_code in (0, 1), result.output  # 1: a service is not SERVING
    parsed: dict[str, Any] = json.loads(result.output)
    parsed["table"] = table.output
    return parsed


async def test_the_reconciler_is_not_serving_while_an_upstream_stream_is_lost(
    metrics_stack: ServiceStack, tmp_path: Path
) -> None:
    """Not ready while the watcher is gone, and ready again by itself once it is back; its liveness,
    as the Deployment probes it, holds throughout: a restart would not bring the watcher back, and
    would stop the queries the reconciler can still answer."""
    stack = metrics_stack
    await _subscribed(stack)
    async with stack.channel("reconciler") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        health = Collector(stub.Watch(health_pb2.HealthCheckRequest(service=""))).start()
        liveness = health_pb2.HealthCheckRequest(service=probed_service("reconciler", Probe.LIVENESS))
        readiness = health_pb2.HealthCheckRequest(service=probed_service("reconciler", Probe.READINESS))
        alive = Collector(stub.Watch(liveness)).start()
        try:
            await alive.until(lambda seen: bool(seen), what="the liveness service's first status")
            await health.until(lambda seen: seen and seen[-1].status == SERVING, what="reconciler SERVING")
            await asyncio.to_thread(stack.stop, "watcher")
            await health.until(
                lambda seen: seen[-1].status == NOT_SERVING,
                what="reconciler NOT_SERVING with the watcher gone",
                seconds=LOSS_TIMEOUT_S + 60,
            )
            assert (await stub.Check(readiness, timeout=10)).status == NOT_SERVING
            assert (await stub.Check(liveness, timeout=10)).status == SERVING
            lost = await scrape(stack.metrics_url("reconciler"))
            assert lost.value("shepherd_health_condition_unmet", condition="upstream") == 1
            assert lost.value("shepherd_reconciler_upstream_connected", upstream="watcher") == 0
            assert lost.value("shepherd_reconciler_upstream_connected", upstream="launcher") == 1
            down_s = lost.value("shepherd_reconciler_upstream_down_seconds", upstream="watcher")
            assert down_s >= LOSS_TIMEOUT_S
            status = await asyncio.to_thread(_status, stack, tmp_path)
            reconciler = next(s for s in status["services"] if s["service"] == "reconciler")
            assert reconciler["health"] == "NOT_SERVING"
            assert len(reconciler["why"]) == 1
            assert reconciler["why"][0].startswith("lost its upstream streams (watcher for ")
            assert "lost its upstream streams (watcher for " in status["table"]

            await asyncio.to_thread(stack.start, ("watcher",))
            await health.until(
                lambda seen: seen[-1].status == SERVING, what="reconciler SERVING again", seconds=60
            )
            back = await scrape(stack.metrics_url("reconciler"))
            assert back.value("shepherd_health_condition_unmet", condition="upstream") == 0
            # The restarted watcher has a new log: the first resubscription may be answered
            # OUT_OF_RANGE and re-sync from a snapshot, a short loss that does not change health.
            await _subscribed(stack)
            assert (await stub.Check(liveness, timeout=10)).status == SERVING
            assert [s.status for s in alive.items] == [SERVING]
        finally:
            await health.stop()
            await alive.stop()
