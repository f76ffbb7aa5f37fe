"""Strategies and lag arithmetic, on nodes that need no server."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from replica_router import (
    LeastInFlight,
    RandomChoice,
    ReplicaRouter,
    RoundRobin,
    RouterSettings,
    Weighted,
)
from replica_router._checkout import Checkout
from replica_router._health import _PrimaryHistory, update_eligibility
from replica_router._nodes import Node

URL = "postgresql://app:pw@127.0.0.1:1/app"


def nodes(count: int, **settings: object) -> tuple[ReplicaRouter, tuple[Node, ...]]:
    urls = [f"{URL}?replica_weight={i + 1}" for i in range(count)]
    router = ReplicaRouter(URL, urls, settings=RouterSettings.defaults(**settings))
    return router, router.replicas


def test_round_robin_takes_each_in_turn() -> None:
    _, replicas = nodes(3)
    picker = RoundRobin()
    assert [picker.select(replicas).name for _ in range(6)] == [
        "replica-1",
        "replica-2",
        "replica-3",
        "replica-1",
        "replica-2",
        "replica-3",
    ]


def test_random_covers_all() -> None:
    _, replicas = nodes(3)
    picker = RandomChoice(random.Random(1))
    assert {picker.select(replicas).name for _ in range(100)} == {
        "replica-1",
        "replica-2",
        "replica-3",
    }


def test_least_in_flight_avoids_the_busy_one() -> None:
    _, replicas = nodes(2)
    replicas[0].state.in_flight = 5
    picker = LeastInFlight(random.Random(1))
    assert {picker.select(replicas).name for _ in range(50)} == {"replica-2"}


def test_weighted_follows_weights() -> None:
    _, replicas = nodes(2)  # weights 1 and 2
    picker = Weighted(random.Random(7))
    counts = Counter(picker.select(replicas).name for _ in range(3000))
    assert 1.7 < counts["replica-2"] / counts["replica-1"] < 2.3


def test_lag_is_zero_when_caught_up_however_idle_the_primary() -> None:
    history = _PrimaryHistory()
    history.add(1000, at=0.0)
    assert history.lag(1000, now=3600.0) == (0, 0.0)


def test_lag_counts_from_when_the_primary_first_had_missing_wal() -> None:
    history = _PrimaryHistory()
    for t, lsn in [(0.0, 100), (1.0, 200), (2.0, 300), (3.0, 400)]:
        history.add(lsn, at=t)
    # The replica replayed up to 250: WAL past it existed on the primary since t=2.
    assert history.lag(250, now=5.0) == (150, 3.0)


def test_lagging_and_slow_replicas_are_not_fit() -> None:
    router, replicas = nodes(3, max_lag_seconds=5, max_lag_bytes=1000)
    replicas[0].state.lag_seconds, replicas[0].state.lag_bytes = 6.0, 10
    for node, latency in zip(replicas, [0.001, 0.001, 0.2], strict=True):
        node.state.latency = latency
    update_eligibility(replicas, router.settings)
    assert replicas[0].state.lagging and replicas[0].state.reason == "lagging"
    assert replicas[2].state.slow and replicas[2].state.reason == "slow"
    assert [n.name for n in router._reads.fit_replicas()] == ["replica-2"]


def test_a_passive_ejection_is_retried_without_probes_after_an_interval() -> None:
    router, replicas = nodes(1, health_interval=0.05)
    replicas[0].state.mark_down("down: test", "test")
    assert router._reads.fit_replicas() == []
    import time

    time.sleep(0.06)
    assert router._reads.fit_replicas() == [replicas[0]]


@pytest.mark.parametrize("fallback", [True, False])
def test_fallback_rules(fallback: bool) -> None:
    from replica_router import NoHealthyReplicaError

    router, replicas = nodes(1, fallback_to_primary=fallback, health_interval=60)
    replicas[0].state.mark_down("down: test", "test")
    replicas[0].state.down_since = None  # never retried
    if fallback:
        assert router._reads.pick([], None, 0)[0] is router.primary
    else:
        with pytest.raises(NoHealthyReplicaError, match="fallback to the primary is off"):
            router._reads.pick([], None, 0)[0]


@pytest.mark.parametrize(
    ("latency", "bound"),
    [
        (None, 5.0),  # not measured yet: the connect timeout
        (0.001, 0.25),  # a quick node: the floor
        (0.0201, 0.41),  # 20x its latency, rounded up to whole hundredths
        (0.03, 0.6),
        (1.0, 5.0),  # never past the connect timeout
    ],
)
def test_the_begin_bound(latency: float | None, bound: float) -> None:
    # Few distinct bounds: the asyncpg driver keeps one configuration per bound.
    settings = RouterSettings.defaults(connect_timeout=5.0)
    _, (node,) = nodes(1, connect_timeout=5.0)
    node.state.latency = latency
    assert Checkout(settings, lambda node: None).begin_bound(node) == pytest.approx(bound)
