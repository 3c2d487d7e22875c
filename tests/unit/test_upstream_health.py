"""When the reconciler counts its upstream streams as lost: only once one has been down longer
than the timeout, counted from the start until its first subscription, and never once back."""

from __future__ import annotations

from services.reconciler.metrics import Upstream
from services.reconciler.upstream import UpstreamHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _ignore(_: bool) -> None:
    return None


def test_a_stream_never_subscribed_counts_as_lost_from_the_start() -> None:
    clock = Clock()
    health = UpstreamHealth(on_change=_ignore, loss_timeout_s=30, clock=clock)
    health.up(Upstream.LAUNCHER)
    clock.now += 29.9
    assert health.lost() == []
    clock.now += 0.1
    assert health.lost() == [Upstream.WATCHER]


def test_a_short_loss_is_not_a_loss_and_a_long_one_ends_when_it_is_back() -> None:
    clock = Clock()
    health = UpstreamHealth(on_change=_ignore, loss_timeout_s=30, clock=clock)
    for upstream in Upstream:
        health.up(upstream)
    health.down(Upstream.WATCHER)
    clock.now += 10
    health.up(Upstream.WATCHER)  # reconnected: the loss is over
    clock.now += 100
    assert health.lost() == []
    health.down(Upstream.LAUNCHER)
    clock.now += 20
    health.down(Upstream.LAUNCHER)  # a second break does not restart the count
    clock.now += 10
    assert health.lost() == [Upstream.LAUNCHER]
    health.up(Upstream.LAUNCHER)
    assert health.lost() == []
