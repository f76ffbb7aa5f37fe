"""Prometheus metrics, with the ``metrics`` extra (``prometheus-client``).

Each node of the router becomes a set of gauges and counters labelled by node name
and role, read from ``router.status()`` at scrape time: nothing is added to the
request path, and nothing runs between scrapes.

Example::

    from replica_router.metrics import mount_metrics

    mount_metrics(app, router)  # serves /metrics/
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import FastAPI

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from replica_router import ReplicaRouter


__all__ = ["mount_metrics"]


def mount_metrics(
    app: FastAPI, router: ReplicaRouter | None = None, path: str = "/metrics"
) -> None:
    """Serve Prometheus metrics at ``path``; does nothing without prometheus-client."""
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, make_asgi_app
        from prometheus_client.registry import Collector
    except ImportError:
        return

    # One registry per app: building a second app (tests) must not clash with the first.
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    if router is not None:
        watched = router

        class RouterCollector(Collector):
            def collect(self) -> Iterator[Metric]:
                return _router_metrics(watched)

        registry.register(RouterCollector())
    app.mount(path, make_asgi_app(registry))


def _router_metrics(router: ReplicaRouter) -> Iterator[Metric]:
    """Every node's state, read from ``router.status()``."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    from ._nodes import CHECKOUT_BUCKETS

    labels = ["node", "role"]
    healthy = GaugeMetricFamily(
        "replica_router_node_healthy", "1 if the node may serve its role now", labels=labels
    )
    lag_seconds = GaugeMetricFamily(
        "replica_router_replica_lag_seconds", "replay lag of a replica, seconds", labels=labels
    )
    lag_bytes = GaugeMetricFamily(
        "replica_router_replica_lag_bytes", "replay lag of a replica, bytes", labels=labels
    )
    patroni_lag = GaugeMetricFamily(
        "replica_router_replica_patroni_lag_bytes",
        "replay lag of a replica as Patroni reports it, bytes (members Patroni lists)",
        labels=labels,
    )
    in_flight = GaugeMetricFamily(
        "replica_router_node_in_flight", "sessions open on the node now", labels=labels
    )
    sessions = CounterMetricFamily(
        "replica_router_node_sessions", "sessions handed out on the node", labels=labels
    )
    failures = CounterMetricFamily(
        "replica_router_node_checkout_failures",
        "failed attempts to get a working connection",
        labels=labels,
    )
    ejections = CounterMetricFamily(
        "replica_router_node_ejections", "times the node was marked down", labels=labels
    )
    retries = CounterMetricFamily(
        "replica_router_node_retries", "checkouts and units of work retried", labels=labels
    )
    failovers = CounterMetricFamily(
        "replica_router_node_failovers", "times the primary was found read-only", labels=labels
    )
    checkout = HistogramMetricFamily(
        "replica_router_checkout_seconds",
        "time to get a proven connection with its transaction begun",
        labels=labels,
    )
    status = router.status()
    for node in status.nodes:
        key = [node.name, node.role]
        healthy.add_metric(key, 1.0 if node.healthy else 0.0)
        if node.lag_seconds is not None:
            lag_seconds.add_metric(key, node.lag_seconds)
        if node.lag_bytes is not None:
            lag_bytes.add_metric(key, node.lag_bytes)
        if node.patroni_lag_bytes is not None:
            patroni_lag.add_metric(key, node.patroni_lag_bytes)
        in_flight.add_metric(key, node.in_flight)
        sessions.add_metric(key, node.sessions)
        failures.add_metric(key, node.checkout_failures)
        ejections.add_metric(key, node.ejections)
        retries.add_metric(key, node.retries)
        failovers.add_metric(key, node.failovers)
        if node.checkout_histogram:
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*map(str, CHECKOUT_BUCKETS), "+Inf"), node.checkout_histogram, strict=True
            ):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            checkout.add_metric(key, buckets, node.checkout_seconds)
    fallback = GaugeMetricFamily(
        "replica_router_fallback_in_flight", "reads served by the primary as a fallback now"
    )
    fallback.add_metric([], status.fallback_in_flight)
    yield from (healthy, lag_seconds, lag_bytes, patroni_lag, in_flight, sessions)
    yield from (failures, ejections)
    decisions = CounterMetricFamily(
        "replica_router_read_decisions",
        "where reads went and why, per read policy (read-your-writes, lag bound)",
        labels=["policy", "decision"],
    )
    for policy in status.reads:
        for decision, count in policy.decisions.items():
            decisions.add_metric([policy.name, decision], count)
    yield from (retries, failovers, checkout, decisions)
    yield fallback
