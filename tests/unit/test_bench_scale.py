"""The scale scenario's pure logic: how waves keep the live count, and the verdict on its samples."""

from __future__ import annotations

from bench.scale import (
    Check,
    Sample,
    Settled,
    batch_for,
    cpu_ms_per_task,
    flat,
    settled_after,
    verdict,
    wave_size,
)

SERVICES = ("launcher", "watcher", "reconciler")


def simulate(total: int, live: int, batch: int, finish_per_step: int) -> list[tuple[int, int]]:
    """(launched, done) after each step: launch waves until wave_size says none (as the scenario
    does before it waits for tasks to end), then some tasks finish."""
    launched = done = 0
    steps = []
    while done < total:
        while n := wave_size(launched, done, total, live, batch):
            launched += n
        done = min(launched, done + finish_per_step)
        steps.append((launched, done))
    return steps


def test_waves_keep_the_live_count_at_most_live_and_launch_every_task_once() -> None:
    steps = simulate(total=10_250, live=1000, batch=100, finish_per_step=37)
    assert all(launched - done <= 1000 for launched, done in steps)
    assert steps[-1] == (10_250, 10_250)
    # The live count comes back to within a batch of `live` after every wave, until the tail.
    assert all(launched - done > 1000 - 100 - 37 for launched, done in steps if launched < 10_250)


def test_a_wave_waits_for_a_full_batch_of_free_slots_except_the_last() -> None:
    assert wave_size(launched=1000, done=0, total=5000, live=1000, batch=100) == 0
    assert wave_size(launched=1000, done=99, total=5000, live=1000, batch=100) == 0
    assert wave_size(launched=1000, done=100, total=5000, live=1000, batch=100) == 100
    assert wave_size(launched=4950, done=4000, total=5000, live=1000, batch=100) == 50
    assert wave_size(launched=5000, done=5000, total=5000, live=1000, batch=100) == 0


def test_batches_are_a_tenth_of_the_live_count_up_to_500() -> None:
    assert [batch_for(n) for n in (5, 1000, 10_000, 100_000)] == [1, 100, 500, 500]


def sample(
    t: float,
    done: int,
    *,
    rss: float = 100.0,
    store: float = 10.0,
    cpu_ms: float = 1.0,
    total: int = 10_000,
) -> Sample:
    """A sample of a run in which each task costs `cpu_ms` of every service's CPU."""
    return Sample(
        elapsed_s=t,
        launched=min(total, done + 1000),
        done=done,
        rss_mb=dict.fromkeys(SERVICES, rss),
        store_mb={"launcher": store, "reconciler": store},
        rows={},
        cpu_s=dict.fromkeys(SERVICES, done * cpu_ms / 1000),
    )


def steady_run(total: int = 10_000, steps: int = 20, **kwargs: float) -> list[Sample]:
    return [sample(10.0 * i, total * i // steps, total=total, **kwargs) for i in range(steps + 1)]


def by_name(checks: list[Check]) -> dict[str, bool | None]:
    return {c.name.split(" (")[0].split(" <=")[0]: c.ok for c in checks}


def test_a_run_that_keeps_its_figures_meets_every_target() -> None:
    checks = verdict(steady_run(), 10_000, settled=Settled(30.0, 0))
    assert [c.ok for c in checks] == [True, True, True, True], checks


def test_per_task_cpu_is_measured_between_the_start_and_end_windows() -> None:
    # Tasks cost 1 ms until 5,000 are done, then 2 ms: the end window sees twice the start's.
    samples = []
    cpu = 0.0
    for i in range(21):
        done = 500 * i
        samples.append(sample(10.0 * i, done))
        samples[-1].cpu_s.update(dict.fromkeys(SERVICES, cpu))
        cpu += 0.5 if done < 5000 else 1.0
    start = cpu_ms_per_task(samples, 1000, 3000)
    end = cpu_ms_per_task(samples, 7000, 9000)
    assert start == dict.fromkeys(SERVICES, 1.0)
    assert end == dict.fromkeys(SERVICES, 2.0)
    assert by_name(verdict(samples, 10_000, settled=Settled(30.0, 0)))["per-task CPU at the end"] is False


def test_rss_over_the_limit_is_missed() -> None:
    checks = verdict(steady_run(rss=301.0), 10_000, settled=Settled(30.0, 0))
    assert by_name(checks)["RSS"] is False


def test_growth_once_retention_applies_is_missed_and_noise_is_not() -> None:
    assert flat([10.0, 12.0, 11.0, 12.5])[0]  # within 10 %
    assert flat([1.0, 1.0, 2.0, 2.5])[0]  # a few MB of noise on a small store
    assert not flat([100.0, 110.0, 125.0, 140.0])[0]
    growing = [sample(10.0 * i, 500 * i, store=10.0 + 3 * i) for i in range(21)]
    assert (
        by_name(verdict(growing, 10_000, settled=Settled(30.0, 0)))["store size flat once retention applies"]
        is False
    )


def test_growth_before_retention_applies_is_allowed() -> None:
    samples = [sample(10.0 * i, 500 * i, store=min(50.0, 10.0 * i)) for i in range(21)]
    assert by_name(verdict(samples, 10_000, settled=Settled(50.0, 0)))[
        "store size flat once retention applies"
    ]


def test_a_run_too_short_for_its_retention_or_its_windows_is_not_measured() -> None:
    short = [sample(10.0 * i, 500 * i) for i in range(8)]  # 3,500 of 10,000 done
    checks = by_name(verdict(short, 10_000, settled=settled_after(120.0, 5.0, 200_000)))
    assert checks["RSS flat once retention applies"] is None
    assert checks["store size flat once retention applies"] is None
    assert checks["per-task CPU at the end"] is None
    assert checks["RSS"] is True


def test_growth_until_the_count_bounded_caches_are_full_is_allowed() -> None:
    # RSS grows until 7,000 tasks are done (a cache of 7,000 finished tasks), then stays.
    samples = [sample(10.0 * i, 500 * i, rss=100.0 + 5 * min(i, 14)) for i in range(21)]
    assert (
        by_name(verdict(samples, 10_000, settled=Settled(30.0, 0)))["RSS flat once retention applies"]
        is False
    )
    assert by_name(verdict(samples, 10_000, settled=Settled(30.0, 7000)))["RSS flat once retention applies"]


def test_the_steady_state_waits_for_the_retention_and_the_reconcilers_finished_task_cache() -> None:
    settled = settled_after(120.0, 5.0, 200_000)
    assert settled.seconds == 250.0
    assert settled.tasks == 50_000  # the watcher's 200,000 events at 4 per task, past the 20,000
    assert settled_after(10.0, 2.0, 2000).tasks == 20_000
