"""Scale as work grows: 200,000 tasks through the suite, 10,000 live at a time, with a short retention.

The other scenarios measure a fresh stack. A service that keeps something per task and never lets
it go (a row, a dict entry, an index that only grows) passes all of them and fails after a week in
production. Here tasks are launched in waves that keep the live count (launched, not yet terminal)
at `live`, on kwok with short pods, and the stores' retention is short enough that pruning runs
from early in the run, so by the end the suite has long been in its steady state: if nothing grows
per task, each service's RSS and store size stop growing once retention applies, and the CPU a
task costs at the end is what it cost at the start (both measured in the same run, so the
machine's speed cancels out).

Every `sample_s` it records the tasks done, each service's RSS and CPU time, each store's size
(database plus WAL) and the rows of each of its tables (what grows, if something does). The
verdict (`verdict`) is pure, as is the wave scheduling (`wave_size`): tests/unit/test_bench_scale.py.

How the targets are judged:
- RSS at most 300 MB per service: its peak over the run.
- RSS and store size flat once retention applies: on the samples from the steady state (twice the
  retention plus a tick into the run; for RSS also once the count-bounded caches are full, the
  reconciler's 20,000 finished tasks and the watcher's `event_retention` events) until 90% of
  the tasks are done, the later half's peak is at most 10% (plus 2 MB of noise) above the
  earlier half's.
- Per-task CPU at the end within 10% of the start: each service's CPU per task done between 70%
  and 90% of the tasks is at most 1.1 times that between 10% and 30%. Only growth counts: a task
  that costs less at the end than at the start is no scaling problem.
A run too short to reach a window reports that target as not measured.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, rss_mb, run_changes
from controlplane.stack import SERVICES, ServiceStack
from services.reconciler.engine import _TERMINAL_CACHE as RECONCILER_FINISHED_CACHE
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2, task_pb2

STORES = ("launcher", "reconciler")  # the watcher keeps its events in memory only
# A store's size counts its WAL: between checkpoints that is where the newest pages are.
STORE_FILES = ("", "-wal")
# Start and end windows of the per-task CPU figure, as fractions of the tasks done: after the first
# wave has warmed up the stack, and before the last waves drain (fewer live tasks, other costs).
START_WINDOW = (0.1, 0.3)
END_WINDOW = (0.7, 0.9)
RSS_LIMIT_MB = 300.0
CPU_GROWTH_LIMIT = 1.10  # per-task CPU at the end / at the start
FLAT_LIMIT = 1.10  # the later half's peak over the earlier half's, once retention applies
FLAT_SLACK_MB = 2.0  # a few MB of allocator or page-cache noise is not growth
# Pod events the watcher logs per task, at least (added, scheduled, running, finished): how many
# tasks it takes to fill its event log.
EVENTS_PER_TASK = 4


@dataclass(frozen=True)
class Sample:
    """The suite at one moment of the run; CPU is cumulative since the run started."""

    elapsed_s: float
    launched: int
    done: int
    rss_mb: dict[str, float]
    store_mb: dict[str, float]
    rows: dict[str, int]
    cpu_s: dict[str, float]

    @property
    def live(self) -> int:
        return self.launched - self.done


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: the run was too short to tell
    detail: str


def wave_size(launched: int, done: int, total: int, live: int, batch: int) -> int:
    """How many tasks to launch now: a full batch once that many slots are free (so launches go
    in batches, not one call per finished task), the remainder at the end, otherwise none."""
    remaining = total - launched
    free = live - (launched - done)
    wanted = min(batch, remaining)
    if wanted <= 0 or free < wanted:
        return 0
    return wanted


def _at_done(samples: Sequence[Sample], target: float) -> Sample:
    """The first sample with at least `target` tasks done (the last one if none has)."""
    return next((s for s in samples if s.done >= target), samples[-1])


def cpu_ms_per_task(samples: Sequence[Sample], lo: float, hi: float) -> dict[str, float] | None:
    """Each service's CPU per task done (ms) between the first samples with `lo` and with `hi` tasks
    done; None when no task was done in between."""
    first, last = _at_done(samples, lo), _at_done(samples, hi)
    tasks = last.done - first.done
    if tasks <= 0:
        return None
    return {name: 1000 * (last.cpu_s[name] - first.cpu_s[name]) / tasks for name in last.cpu_s}


def window_cpu_ms(before: Sample, after: Sample) -> dict[str, float | None]:
    """Each service's CPU per task done (ms) between two consecutive samples: the table's column."""
    tasks = after.done - before.done
    return {
        name: (1000 * (after.cpu_s[name] - before.cpu_s[name]) / tasks if tasks > 0 else None)
        for name in after.cpu_s
    }


def flat(series: Sequence[float]) -> tuple[bool, float, float]:
    """Whether a measure stopped growing: the peak of the later half of `series` is at most
    FLAT_LIMIT times the earlier half's (plus FLAT_SLACK_MB). Returns (ok, earlier, later) peaks."""
    half = len(series) // 2
    earlier, later = max(series[:half]), max(series[half:])
    return later <= earlier * FLAT_LIMIT + FLAT_SLACK_MB, earlier, later


@dataclass(frozen=True)
class Settled:
    """From when the suite is in its steady state: both must be reached."""

    seconds: float  # the stores': retention has pruned for a while
    tasks: int  # the in-memory bounds': caches bounded by a count are full


def settled_after(retention_s: float, interval_s: float, event_retention: int) -> Settled:
    """The stores are in their steady state once the first entries are due (one retention period
    plus a tick) and the pages their pruning freed have been reused (twice that). The services'
    count-bounded memory is full once the reconciler has cached its finished tasks and the watcher
    has logged `event_retention` pod events: until then their RSS grows by design."""
    return Settled(
        seconds=2 * (retention_s + interval_s),
        tasks=max(RECONCILER_FINISHED_CACHE, event_retention // EVENTS_PER_TASK),
    )


def verdict(samples: Sequence[Sample], total: int, settled: Settled) -> list[Check]:
    """The targets against the samples of one run. Flatness is judged on the samples from when
    the suite is `settled` until the drain begins (END_WINDOW's end)."""
    checks: list[Check] = []
    services = list(samples[-1].rss_mb)
    peak = {name: max(s.rss_mb[name] for s in samples) for name in services}
    checks.append(
        Check(
            f"RSS <= {RSS_LIMIT_MB:g} MB per service (up to {max(s.live for s in samples)} live tasks)",
            all(v <= RSS_LIMIT_MB for v in peak.values()),
            "peaks " + ", ".join(f"{n} {v:.0f} MB" for n, v in peak.items()),
        )
    )
    for measure, names, from_tasks in (
        ("RSS", services, settled.tasks),
        ("store size", list(samples[-1].store_mb), 0),  # the stores hold no count-bounded cache
    ):
        steady = [
            s
            for s in samples
            if s.elapsed_s >= settled.seconds and from_tasks <= s.done <= END_WINDOW[1] * total
        ]
        if len(steady) < 4:
            checks.append(
                Check(
                    f"{measure} flat once retention applies",
                    None,
                    f"{len(steady)} samples from {settled.seconds:g} s and {from_tasks} tasks done "
                    f"until {END_WINDOW[1]:.0%} of the tasks (the steady state): the run is too short",
                )
            )
            continue
        parts, ok = [], True
        for name in names:
            series = [s.rss_mb[name] if measure == "RSS" else s.store_mb[name] for s in steady]
            good, earlier, later = flat(series)
            ok &= good
            parts.append(f"{name} {earlier:.1f} -> {later:.1f} MB")
        checks.append(
            Check(
                f"{measure} flat once retention applies",
                ok,
                "peaks, earlier -> later half: " + ", ".join(parts),
            )
        )
    start = cpu_ms_per_task(samples, START_WINDOW[0] * total, START_WINDOW[1] * total)
    end = cpu_ms_per_task(samples, END_WINDOW[0] * total, END_WINDOW[1] * total)
    name = f"per-task CPU at the end <= {CPU_GROWTH_LIMIT:g} x at the start"
    if start is None or end is None or samples[-1].done < END_WINDOW[1] * total:
        checks.append(Check(name, None, "the run did not reach both windows"))
    else:
        ratios = {n: end[n] / start[n] if start[n] > 0 else float("inf") for n in start}
        checks.append(
            Check(
                name,
                all(r <= CPU_GROWTH_LIMIT for r in ratios.values()),
                ", ".join(f"{n} {start[n]:.2f} -> {end[n]:.2f} ms ({ratios[n]:.2f})" for n in start),
            )
        )
    return checks


def store_state(workdir: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Each store's size in MB (database + WAL) and the rows of each of its tables."""
    sizes: dict[str, float] = {}
    rows: dict[str, int] = {}
    for name in STORES:
        path = workdir / f"{name}.db"
        sizes[name] = sum(
            p.stat().st_size for suffix in STORE_FILES if (p := Path(f"{path}{suffix}")).exists()
        ) / (1024 * 1024)
        # Read-only, outside the service's transactions: WAL readers never block its writer.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            tables = [
                t
                for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if not t.startswith("sqlite_")
            ]
            for table in tables:
                rows[f"{name}.{table}"] = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            conn.close()
    return sizes, rows


def stack_flags(
    retention_s: float, interval_s: float, live: int, event_retention: int
) -> dict[str, list[str]]:
    retention = ["--retention-s", str(retention_s), "--retention-interval-s", str(interval_s)]
    return {
        # Every wave may wait in the queue at once, and the one scheduler identity is not throttled.
        "launcher": [
            *("--store-synchronous", "FULL"),
            *retention,
            *("--queue-limit", str(max(10_000, live)), "--launch-rate", "0"),
        ],
        "reconciler": retention,
        "watcher": ["--event-retention", str(event_retention)],
    }


# The table's row counts: what would show something kept per task and never pruned.
ROWS = (
    ("launches", "launcher.launches"),
    ("events", "launcher.launch_events"),
    ("tasks", "reconciler.tasks"),
    ("transitions", "reconciler.transitions"),
    ("actions", "reconciler.pod_actions"),
    ("tombstones", "reconciler.pruned_tasks"),
)


def header() -> str:
    return (
        f"{'s':>6} {'done':>7} {'live':>6} | {'RSS MB L':>8} {'W':>5} {'R':>5} | {'store MB L':>10} "
        f"{'R':>5} | rows: "
        + " ".join(f"{label:>{max(7, len(label))}}" for label, _ in ROWS)
        + f" | {'CPU ms/task L':>13} {'W':>5} {'R':>5}"
    )


def row(before: Sample | None, s: Sample) -> str:
    cpu = window_cpu_ms(before, s) if before else dict.fromkeys(SERVICES)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rss, store = s.rss_mb, s.store_mb
    return (
        f"{s.elapsed_s:6.0f} {s.done:7d} {s.live:6d} | {rss['launcher']:8.1f} {rss['watcher']:5.1f} "
        f"{rss['reconciler']:5.1f} | {store['launcher']:10.1f} {store['reconciler']:5.1f} | "
        + " ".join(f"{s.rows.get(table, 0):{max(7, len(label))}d}" for label, table in ROWS)
        + f" | {ms(cpu['launcher']):>13} {ms(cpu['watcher']):>5} {ms(cpu['reconciler']):>5}"
    )


def batch_for(live: int) -> int:
    """Tasks per launch call: a tenth of the live count (so ten waves overlap, and the flow of
    creates stays smooth), at most 500 (the size a scheduler's batch would have)."""
    return max(1, min(500, live // 10))


async def measure(
    stack: ServiceStack,
    total: int,
    live: int,
    *,
    sample_s: float = 30.0,
    settled: Settled,
) -> dict[str, Any]:
    run = f"scale-{int(time.time())}"
    batch = batch_for(live)
    pids = {name: stack.procs[name].pid for name in SERVICES}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    done = 0
    launched = 0
    progress = asyncio.Event()
    samples: list[Sample] = []
    began = time.monotonic()

    def sample() -> Sample:
        sizes, rows = store_state(stack.workdir)
        return Sample(
            elapsed_s=round(time.monotonic() - began, 1),
            launched=launched,
            done=done,
            rss_mb={name: round(rss_mb(pid), 1) for name, pid in pids.items()},
            store_mb={name: round(v, 2) for name, v in sizes.items()},
            rows=rows,
            cpu_s={name: round(cpu_seconds(pid) - cpu0[name], 3) for name, pid in pids.items()},
        )

    async def sampler() -> None:
        print(header(), flush=True)
        while True:
            samples.append(await asyncio.to_thread(sample))
            print(row(samples[-2] if len(samples) > 1 else None, samples[-1]), flush=True)
            await asyncio.sleep(sample_s)

    async with stack.scheduler_stubs() as (launcher, reconciler):

        async def subscribe() -> None:
            nonlocal done
            async for change, _ in run_changes(reconciler, run):
                if change.task.state in TERMINAL:
                    done += 1
                    progress.set()

        subscriber = asyncio.create_task(subscribe())
        sampling = asyncio.create_task(sampler())
        try:
            while done < total:
                n = wave_size(launched, done, total, live, batch)
                if n == 0:
                    progress.clear()
                    await asyncio.wait_for(progress.wait(), timeout=600)  # no task ended for 10 min: stuck
                    continue
                requests = [
                    launcher_service_pb2.LaunchTaskRequest(
                        key=task_pb2.TaskKey(
                            dag_id="scale", task_id=f"t{i}", run_id=run, try_number=1, map_index=-1
                        ),
                        command=["run"],
                    )
                    for i in range(launched, launched + n)
                ]
                reply = await launcher.BatchLaunchTasks(
                    launcher_service_pb2.BatchLaunchTasksRequest(requests=requests)
                )
                # A refused task would never end, and the run would wait for it forever.
                if refused := [r.error for r in reply.results if r.HasField("error")]:
                    raise RuntimeError(f"{len(refused)} launches refused, the first: {refused[0]}")
                launched += n
            samples.append(await asyncio.to_thread(sample))
            print(row(samples[-2], samples[-1]), flush=True)
        finally:
            for task in (sampling, subscriber):
                task.cancel()
            await asyncio.gather(sampling, subscriber, return_exceptions=True)
    checks = verdict(samples, total, settled)
    start = cpu_ms_per_task(samples, START_WINDOW[0] * total, START_WINDOW[1] * total)
    end = cpu_ms_per_task(samples, END_WINDOW[0] * total, END_WINDOW[1] * total)
    return {
        "cpu_ms_per_task_start": {n: round(v, 3) for n, v in (start or {}).items()},
        "cpu_ms_per_task_end": {n: round(v, 3) for n, v in (end or {}).items()},
        "peak_rss_mb": {n: max(s.rss_mb[n] for s in samples) for n in SERVICES},
        "tasks": total,
        "live": live,
        "seconds": samples[-1].elapsed_s,
        "tasks_per_s": round(total / samples[-1].elapsed_s, 1),
        "settled": {"seconds": settled.seconds, "tasks": settled.tasks},
        "samples": [
            {
                "elapsed_s": s.elapsed_s,
                "launched": s.launched,
                "done": s.done,
                "rss_mb": s.rss_mb,
                "store_mb": s.store_mb,
                "rows": s.rows,
                "cpu_s": s.cpu_s,
            }
            for s in samples
        ],
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
    }
