"""`python -m bench` (or `make bench`): the suite's figures, each against a baseline or target
measured in the same run on this machine, saved to bench/results/. `--only scale` (not part of the
default run: it takes the better part of an hour) pushes 200,000 tasks through the suite.
`--only airflow` (not part of the default run either: it needs the real node and installs Airflow)
runs one DAG through a real Airflow with the KubernetesExecutor and with Shepherd, side by side."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import uvloop

from bench import airflow, event_latency, launch_rate, memory, pending_timeout, scale
from bench.airflow_figures import side_by_side
from bench.common import Report, fresh_stack

# Durable as in production: every accepted launch is fsynced before LaunchTask answers.
FLAGS = {"launcher": ["--store-synchronous", "FULL"]}


async def run(args: argparse.Namespace) -> Report:
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="shepherd-bench-"))
    if args.only == ["airflow"]:
        compare_airflow(args, workdir, report)
        return report
    print(
        "each phase below runs on a fresh local control plane and a fresh stack of the three "
        "services, each under its own ServiceAccount",
        flush=True,
    )
    if "latency" in args.only:
        print(
            f"\n== event latency: {args.latency_tasks} tasks starting at {args.rate / 2:g}/s, each "
            f"running {args.latency_run_s:g} s: {args.rate:g} status changes/s in steady state",
            flush=True,
        )
        async with fresh_stack(workdir, "latency", flags=FLAGS) as (info, stack):
            print(f"  kube-apiserver {info.version} at {info.server}", flush=True)
            lat = await event_latency.measure(
                info, stack, args.latency_tasks, args.rate, run_s=args.latency_run_s
            )
        report.figures["event_latency"] = lat
        print(
            f"  {lat['events']} events, {lat['steady_rate']}/s in steady state "
            f"({lat['achieved_rate']}/s overall): p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms (from the patch being sent: p50 "
            f"{lat['from_send_p50_ms']} / p99 {lat['from_send_p99_ms']} ms)\n  legs: acknowledged -> "
            f"watcher has it p50 {lat['ack_to_watcher_p50_ms']} / p99 {lat['ack_to_watcher_p99_ms']} ms, "
            f"watcher -> reconciler applied p50 {lat['watcher_to_applied_p50_ms']} / p99 "
            f"{lat['watcher_to_applied_p99_ms']} ms, applied -> "
            f"subscriber p50 {lat['applied_to_subscriber_p50_ms']} "
            f"/ p99 {lat['applied_to_subscriber_p99_ms']} ms"
        )
        report.check(
            f"p99 <= 100 ms at {args.rate:g} events/s", lat["p99_ms"] <= 100, f"p99 {lat['p99_ms']} ms"
        )
    if "rate" in args.only:
        print(
            f"\n== launch rate: {args.pods} pods, raw client vs Shepherd, {args.rounds} rounds each",
            flush=True,
        )
        # Every launch of a round may wait in the launcher's queue at once, and the one scheduler
        # identity may launch as fast as it can: none is refused.
        rate_flags = {
            "launcher": [
                *FLAGS["launcher"],
                *("--queue-limit", str(max(10_000, args.pods)), "--launch-rate", "0"),
            ]
        }
        rate = await launch_rate.measure(workdir, args.pods, args.rounds, args.batch, rate_flags)
        report.figures["launch_rate"] = rate
        print(
            f"  medians of the rounds: raw ceiling {rate['median_raw_pods_per_s']} pods/s, through "
            f"Shepherd {rate['median_shepherd_pods_per_s']} pods/s, ratio {rate['median_ratio']}\n"
            f"  best rounds: raw {rate['raw_pods_per_s']}, Shepherd {rate['shepherd_pods_per_s']} pods/s, "
            f"ratio {rate['ratio']} (its rate counting ghz's own start-up: "
            f"{rate['pods_per_s_including_ghz_startup']} pods/s); launch call p50 "
            f"{rate['launch_rpc_p50_ms']} ms, p99 {rate['launch_rpc_p99_ms']} ms\n"
            f"  end to end, until the last pod is Running (medians): raw "
            f"{rate['running_median_raw_pods_per_s']}, Shepherd {rate['running_median_shepherd_pods_per_s']} "
            f"pods/s, ratio {rate['running_median_ratio']}"
        )
        for phase, used in rate["cpu_core_seconds_last_round"].items():
            print(f"  CPU core-seconds, {phase} phase: {round(sum(used.values()), 2)} {used}")
        report.check(
            "launch rate >= 0.8 x raw ceiling (medians of the rounds)",
            rate["median_ratio"] >= 0.8,
            f"median ratio {rate['median_ratio']} (best rounds: {rate['ratio']})",
        )
    if "memory" in args.only:
        live = args.live or 5000
        print(f"\n== memory: {live} live tasks", flush=True)
        async with fresh_stack(workdir, "memory", flags=FLAGS) as (info, stack):
            mem = await memory.measure(info, stack, live)
        report.figures["memory"] = mem
        print(f"  RSS {mem['rss_mb']} MB (all Running after {mem['seconds_until_all_running']} s)")
        worst = max(mem["rss_mb"].values())
        report.check(f"each service <= 300 MB at {live} live tasks", worst <= 300, f"largest {worst} MB")
    if "pending" in args.only:
        print(
            f"\n== pending timeout: {args.pending} pods stuck Pending, timeout {args.pending_timeout:g} s, "
            f"launched at {args.pending_launch_rate:g} pods/s (0: as fast as possible)",
            flush=True,
        )
        flags = {**FLAGS, **pending_timeout.stack_flags(args.pending_timeout)}
        async with fresh_stack(workdir, "pending", flags=flags) as (info, stack):
            pend = await pending_timeout.measure(
                info, stack, args.pending, args.pending_timeout, args.pending_launch_rate
            )
        report.figures["pending_timeout"] = pend
        print(
            f"  {pend['deleted']} deleted; lateness after the deadline p50 {pend['lateness_p50_s']} s, "
            f"p99 {pend['lateness_p99_s']} s, max {pend['lateness_max_s']} s\n"
            f"  deadline -> timeout applied p99 {pend['deadline_to_timeout_applied_p99_s']} s, "
            f"max {pend['deadline_to_timeout_applied_max_s']} s; applied -> delete received p99 "
            f"{pend['timeout_applied_to_delete_p99_s']} s, max {pend['timeout_applied_to_delete_max_s']} s\n"
            f"  deadlines falling in the same second: up to {pend['deadlines_per_second_max']}\n"
            f"  cores busy per process: {pend['cpu_cores_busy']}",
            flush=True,
        )
        report.check(
            f"stuck pods deleted within 1 s of the deadline at {args.pending} pending",
            pend["lateness_max_s"] <= 1.0 and pend["deleted"] == args.pending,
            f"max {pend['lateness_max_s']} s, {pend['deleted']}/{args.pending} deleted",
        )
    if "scale" in args.only:
        live = args.live or 10_000
        print(
            f"\n== scale: {args.tasks} tasks, {live} live at a time, retention "
            f"{args.retention_s:g} s (tick {args.retention_interval_s:g} s), the watcher keeping "
            f"{args.event_retention} events",
            flush=True,
        )
        flags = scale.stack_flags(args.retention_s, args.retention_interval_s, live, args.event_retention)
        async with fresh_stack(workdir, "scale", flags=flags) as (_, stack):
            result = await scale.measure(
                stack,
                args.tasks,
                live,
                sample_s=args.sample_s,
                settled=scale.settled_after(
                    args.retention_s, args.retention_interval_s, args.event_retention
                ),
            )
        report.figures["scale"] = result
        print(f"  {result['tasks']} tasks in {result['seconds']} s ({result['tasks_per_s']}/s)")
        for check in result["checks"]:
            report.check(check["name"], check["ok"], check["detail"])
    if "airflow" in args.only:
        compare_airflow(args, workdir, report)
    return report


def compare_airflow(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    print(
        f"\n== Airflow: one DAG of {args.airflow_tasks} short tasks (+1 seed task), KubernetesExecutor "
        f"(defaults, tuned) vs Shepherd, parallelism {args.airflow_parallelism}, on the shared local "
        "cluster's real node",
        flush=True,
    )
    result = airflow.measure(workdir / "airflow", args.airflow_tasks, args.airflow_parallelism)
    report.figures["airflow"] = result
    print()
    for line in side_by_side(result["phases"], airflow.BASELINE):
        print(f"  {line}")
    for name, phase in result["phases"].items():
        print(
            f"  {name}: {phase['states']}; {phase['pods_created']} pods, deletes by client "
            f"{phase['delete_calls_by_client']}; scheduler CPU by process {phase['scheduler_cpu_by_process']}"
            f"; other CPU {phase['other_cpu_s']}"
            + (f"; services {phase['services_cpu_by_service']}" if phase["services_cpu_by_service"] else "")
        )
        report.check(
            f"{name}: every task instance succeeded",
            phase["all_succeeded"],
            f"{phase['states']}, run {phase['run_state']}",
        )
        report.check(
            f"{name}: one pod per task instance, each deleted",
            phase["pods_created"] == result["task_instances"] and phase["pods_never_deleted"] == 0,
            f"{phase['pods_created']} pods for {result['task_instances']} task instances, "
            f"{phase['pods_never_deleted']} never deleted",
        )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--pods",
        type=int,
        default=6000,
        help="pods per launch-rate round (default 6000: long enough to measure the steady state)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=50,
        help="tasks per launch call: 1 uses LaunchTask, more BatchLaunchTasks (default 50)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="launch-rate rounds of each side (default 3)")
    parser.add_argument(
        "--latency-tasks", type=int, default=1000, help="tasks in the latency run (default 1000)"
    )
    parser.add_argument(
        "--rate", type=float, default=200.0, help="status changes per second in steady state (default 200)"
    )
    parser.add_argument(
        "--latency-run-s",
        type=float,
        default=2.0,
        help="how long each latency task runs between its two changes (default 2)",
    )
    parser.add_argument("--pending", type=int, default=5000, help="stuck Pending pods (default 5000)")
    parser.add_argument(
        "--pending-timeout", type=float, default=60.0, help="pending timeout there (default 60)"
    )
    parser.add_argument(
        "--pending-launch-rate",
        type=float,
        default=200.0,
        help="pods/s at which the stuck pods are launched, so deadlines/s later (default 200; 0: at once)",
    )
    parser.add_argument(
        "--live",
        type=int,
        default=None,
        help="live tasks: of the memory figure (default 5000), and at a time in the scale scenario "
        "(default 10000)",
    )
    parser.add_argument(
        "--tasks", type=int, default=200_000, help="tasks of the scale scenario (default 200000)"
    )
    parser.add_argument(
        "--retention-s",
        type=float,
        default=120.0,
        help="the stores' retention in the scale scenario (default 120: pruning from the third minute)",
    )
    parser.add_argument(
        "--retention-interval-s", type=float, default=5.0, help="its retention tick (default 5)"
    )
    parser.add_argument(
        "--event-retention",
        type=int,
        default=200_000,
        help="pod events the watcher keeps there (default 200000, the service's own default)",
    )
    parser.add_argument(
        "--sample-s",
        type=float,
        default=30.0,
        help="seconds between two samples of the scale run (default 30)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["rate", "latency", "memory", "pending"],
        choices=["rate", "latency", "memory", "pending", "scale", "airflow"],
        help="scenarios to run",
    )
    parser.add_argument(
        "--airflow-tasks",
        type=int,
        default=30,
        help="mapped tasks of the Airflow comparison's DAG (default 30: each is a real container "
        "starting Python and Airflow's task runner, several CPU-seconds on this machine; at most 1024)",
    )
    parser.add_argument(
        "--airflow-parallelism",
        type=int,
        default=32,
        help="Airflow's parallelism and max_active_tasks_per_dag in every phase (default 32)",
    )
    args = parser.parse_args()
    if not 1 <= args.airflow_tasks <= 1024:
        parser.error("--airflow-tasks must be 1 to 1024 (the DAG's n parameter, Airflow's max_map_length)")
    # The same event loop as the services: the raw client must not pay more per create than the
    # launcher does, or its ceiling would be understated.
    report = uvloop.run(run(args))
    report.print()
    print(f"\nsaved {report.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
