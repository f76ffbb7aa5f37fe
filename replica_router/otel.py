"""OpenTelemetry spans and metrics, with the ``otel`` extra (``opentelemetry-api``).

Spans need no call: with a tracer provider configured (an SDK's) when the first
session opens, every reader and writer checkout is a span, and a writer's COMMIT too
(see ``README``, "Seeing where a request went"). :func:`instrument` names the
providers explicitly, turns spans on for a provider configured later, and registers
the metrics: observable instruments read from ``router.status()`` when the meter
provider collects, so they always agree with ``status()``, the health routes and the
Prometheus metrics, and nothing is added to the request path.

Example::

    from replica_router.otel import instrument

    instrument(router)  # the global providers; or tracer_provider=..., meter_provider=...
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.trace import NoOpTracer, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "replica_router.otel needs opentelemetry-api: pip install 'replica-router[otel]'"
    ) from exc

from ._nodes import CHECKOUT_BUCKETS
from ._otel import SCOPE, OtelTracing, version
from ._status import NodeStatus, RouterStatus

if TYPE_CHECKING:
    from replica_router import ReplicaRouter

__all__ = ["METRICS", "instrument", "uninstrument"]

# name: (kind, unit, description); every one is read from router.status().
METRICS: dict[str, tuple[str, str, str]] = {
    "db.client.connection.count": (
        "updowncounter",
        "{connection}",
        "connections the router's sessions use on the node now (state=used: in flight)",
    ),
    "replica_router.node.healthy": ("gauge", "1", "1 if the node may serve its role now"),
    "replica_router.replica.lag": (
        "gauge",
        "s",
        "how long ago the primary first had WAL this replica has not replayed",
    ),
    "replica_router.replica.lag.size": (
        "gauge",
        "By",
        "WAL this replica has not replayed yet, against the primary's newest position",
    ),
    "replica_router.node.sessions": ("counter", "{session}", "sessions handed out on the node"),
    "replica_router.checkout.failures": (
        "counter",
        "{failure}",
        "failed attempts to get a working connection",
    ),
    "replica_router.node.ejections": ("counter", "{ejection}", "times the node was marked down"),
    "replica_router.node.retries": (
        "counter",
        "{retry}",
        "checkouts and units of work retried",
    ),
    "replica_router.node.failovers": (
        "counter",
        "{failover}",
        "times the primary was found read-only",
    ),
    "replica_router.checkout.count": (
        "counter",
        "{checkout}",
        "checkouts (connection proven, transaction begun) that took at most `le` seconds: "
        "cumulative buckets, le=+Inf counts them all",
    ),
    "replica_router.checkout.duration": (
        "counter",
        "s",
        "total time of those checkouts",
    ),
    "replica_router.read.decisions": (
        "counter",
        "{read}",
        "where reads went and why, per read policy",
    ),
    "replica_router.fallback.in_flight": (
        "updowncounter",
        "{session}",
        "reads served by the primary as a fallback now",
    ),
    "replica_router.fallback.limit": (
        "updowncounter",
        "{session}",
        "most fallback reads the primary serves at once",
    ),
}

_BOUNDS = (*map(str, CHECKOUT_BUCKETS), "+Inf")


def instrument(
    router: ReplicaRouter,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    tracing: bool = True,
    metrics: bool = True,
    name: str | None = None,
) -> None:
    """Spans for ``router``'s sessions, and its metrics.

    Args:
        router: the router.
        tracer_provider: instead of the global one. Without it, the global provider
            is used even if it is configured only later (the API's proxy).
        meter_provider: instead of the global one.
        tracing: ``False`` turns the router's spans off (also the automatic ones).
        metrics: ``False`` registers no metrics.
        name: a ``replica_router.router`` attribute on the router's metrics, to tell
            apart several routers of one process (their nodes' names may repeat).
    """
    if tracing:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        tracer = provider.get_tracer(SCOPE, version())
        router._checkout.trace = None if isinstance(tracer, NoOpTracer) else OtelTracing(tracer)
    else:
        router._checkout.trace = None
    if metrics:
        meters = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
        registry = _REGISTRIES.get(meters)
        if registry is None:
            registry = _REGISTRIES[meters] = _Registry(meters.get_meter(SCOPE, version()))
        registry.add(router, name)


def uninstrument(router: ReplicaRouter) -> None:
    """No more spans for ``router``'s sessions, and its metrics are no longer reported."""
    router._checkout.trace = None
    for registry in list(_REGISTRIES.values()):
        registry.discard(router)


Read = Callable[[RouterStatus], Iterable[tuple[float, dict[str, Any]]]]


class _Registry:
    """One meter's instruments, reporting every router instrumented with it.

    An SDK keeps the callbacks of the first instrument of a name only, so a second
    router joins the first one's instruments instead of making its own.
    """

    __slots__ = ("__weakref__", "_routers")

    def __init__(self, meter: Meter) -> None:
        self._routers: list[tuple[weakref.ref[ReplicaRouter], str | None]] = []
        for name, read in _READS.items():
            kind, unit, description = METRICS[name]
            callbacks = [self._callback(read)]
            if kind == "gauge":
                meter.create_observable_gauge(name, callbacks, unit, description)
            elif kind == "counter":
                meter.create_observable_counter(name, callbacks, unit, description)
            else:
                meter.create_observable_up_down_counter(name, callbacks, unit, description)

    def add(self, router: ReplicaRouter, name: str | None) -> None:
        self.discard(router)
        self._routers.append((weakref.ref(router), name))

    def discard(self, router: ReplicaRouter) -> None:
        self._routers = [(r, n) for r, n in self._routers if r() not in (None, router)]

    def routers(self) -> list[tuple[ReplicaRouter, str | None]]:
        return [(router, name) for ref, name in self._routers if (router := ref()) is not None]

    def _callback(self, read: Read) -> Callable[[CallbackOptions], Iterable[Observation]]:
        # A weak reference: the meter provider must not keep the registry alive.
        registry = weakref.ref(self)

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            me = registry()
            if me is None:
                return
            for router, name in me.routers():
                for value, attributes in read(router.status()):
                    if name is not None:
                        attributes["replica_router.router"] = name
                    yield Observation(value, attributes)

        return callback


_REGISTRIES: weakref.WeakKeyDictionary[MeterProvider, _Registry] = weakref.WeakKeyDictionary()


def _node(node: NodeStatus) -> dict[str, Any]:
    return {"replica_router.node": node.name, "replica_router.node.role": node.role}


def _per_node(value: Callable[[NodeStatus], float | None]) -> Read:
    def read(status: RouterStatus) -> Iterator[tuple[float, dict[str, Any]]]:
        for node in status.nodes:
            observed = value(node)
            if observed is not None:
                yield observed, _node(node)

    return read


def _connections(status: RouterStatus) -> Iterator[tuple[float, dict[str, Any]]]:
    for node in status.nodes:
        attributes = _node(node)
        attributes["db.client.connection.pool.name"] = node.name
        attributes["db.client.connection.state"] = "used"
        yield node.in_flight, attributes


def _checkouts(status: RouterStatus) -> Iterator[tuple[float, dict[str, Any]]]:
    for node in status.nodes:
        cumulative = 0
        for bound, count in zip(_BOUNDS, node.checkout_histogram, strict=False):
            cumulative += count
            attributes = _node(node)
            attributes["le"] = bound
            yield cumulative, attributes


def _decisions(status: RouterStatus) -> Iterator[tuple[float, dict[str, Any]]]:
    for policy in status.reads:
        for decision, count in policy.decisions.items():
            yield count, {"replica_router.policy": policy.name, "replica_router.decision": decision}


def _router_wide(value: Callable[[RouterStatus], float]) -> Read:
    def read(status: RouterStatus) -> Iterator[tuple[float, dict[str, Any]]]:
        yield value(status), {}

    return read


_READS: dict[str, Read] = {
    "db.client.connection.count": _connections,
    "replica_router.node.healthy": _per_node(lambda n: 1.0 if n.healthy else 0.0),
    "replica_router.replica.lag": _per_node(
        lambda n: n.lag_seconds if n.role == "replica" else None
    ),
    "replica_router.replica.lag.size": _per_node(
        lambda n: n.lag_bytes if n.role == "replica" else None
    ),
    "replica_router.node.sessions": _per_node(lambda n: n.sessions),
    "replica_router.checkout.failures": _per_node(lambda n: n.checkout_failures),
    "replica_router.node.ejections": _per_node(lambda n: n.ejections),
    "replica_router.node.retries": _per_node(lambda n: n.retries),
    "replica_router.node.failovers": _per_node(lambda n: n.failovers),
    "replica_router.checkout.count": _checkouts,
    "replica_router.checkout.duration": _per_node(lambda n: n.checkout_seconds),
    "replica_router.read.decisions": _decisions,
    "replica_router.fallback.in_flight": _router_wide(lambda s: s.fallback_in_flight),
    "replica_router.fallback.limit": _router_wide(lambda s: s.fallback_cap),
}
