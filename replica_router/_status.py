"""Snapshots of the router's state, for ``router.status()`` and the health routes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ._nodes import CHECKOUT_BUCKETS, Node, Role
from ._urls import mask_url

__all__ = ["NodeStatus", "ReadPolicyStatus", "RouterStatus", "node_status"]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node as the router sees it. ``url`` is masked; nothing here holds a password.

    ``role`` is the configured role, ``server_role`` what the server last reported
    (``None`` before the first probe); ``healthy`` means fit to serve its role, and
    ``reason`` says why not.
    """

    name: str
    role: str
    server_role: str | None
    url: str
    healthy: bool
    reason: str | None
    lag_seconds: float | None
    lag_bytes: int | None
    in_flight: int
    latency_ms: float | None
    last_error: str | None
    server_version: str | None
    sessions: int
    checkout_failures: int
    ejections: int
    retries: int
    failovers: int
    weight: float
    # Checkouts per upper bound of ``CHECKOUT_BUCKETS`` in ``replica_router._nodes`` (not
    # cumulative; the last: slower), and their total seconds. ``to_dict`` labels them.
    checkout_histogram: tuple[int, ...] = ()
    checkout_seconds: float = 0.0
    # The lag in bytes Patroni's REST API reports for a member it discovered (None for
    # other nodes, or when Patroni gives none): above max_lag_bytes, it serves no reads.
    patroni_lag_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ReadPolicyStatus:
    """One group of reads (``default``, or a ``router.reader_with(...)``) and how often
    each routing decision was taken for it.

    Decisions: ``replica``, ``replica_after_check`` (the replica's position was
    re-read), ``replica_after_wait``, ``primary_behind`` (no replica replayed the
    client's write in time), ``primary_after_write`` (request mode),
    ``primary_fallback`` (no fit replica), ``token_ignored``.

    ``max_lag_seconds`` and ``max_lag_bytes`` are the bounds in force for these reads
    (``max_lag_bytes`` is None when a route's own ``max_lag_seconds`` replaces both).
    """

    name: str
    read_your_writes: str
    max_lag_seconds: float | None
    decisions: dict[str, int]
    max_lag_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RouterStatus:
    """Every node, primary first, the router-wide counters, and the read policies.

    ``started``: ``router.start()`` (or the lifespan) ran. ``read_your_writes_active``:
    positions reach clients (the mode is not off and :class:`ReadYourWritesMiddleware` is
    in place). ``warnings``: what is wrong with the set-up, in words.
    """

    nodes: tuple[NodeStatus, ...]
    fallback_in_flight: int
    fallback_cap: int
    strategy: str
    health_checks_running: bool
    read_your_writes: str = "off"
    reads: tuple[ReadPolicyStatus, ...] = ()
    started: bool = False
    read_your_writes_active: bool = False
    fallback_to_primary: bool = True
    warnings: tuple[str, ...] = ()

    @property
    def primary(self) -> NodeStatus:
        return self.nodes[0]

    def node(self, name: str) -> NodeStatus:
        """The status of the node called ``name``."""
        for status in self.nodes:
            if status.name == name:
                return status
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; each node's ``checkout_histogram`` maps an upper bound
        in seconds (Prometheus' ``le``, not cumulative) to its count."""
        data = asdict(self)
        bounds = [*map(str, CHECKOUT_BUCKETS), "+Inf"]
        for node in data["nodes"]:
            counts = node["checkout_histogram"]
            node["checkout_histogram"] = dict(zip(bounds, counts, strict=True)) if counts else {}
        return data

    def readiness(self) -> dict[str, Any]:
        """Which of reads and writes can be served now, and by which nodes.

        Writes need the primary up and not in recovery. Reads need a fit replica, or
        the primary when there are no replicas or the fallback is allowed.
        """
        primary = self.primary
        writes = primary.healthy and primary.server_role != "replica"
        replicas = [n.name for n in self.nodes[1:] if n.healthy]
        primary_reads = primary.healthy and (len(self.nodes) == 1 or self.fallback_to_primary)
        reads_from = replicas or ([primary.name] if primary_reads else [])
        return {"reads": bool(reads_from), "writes": writes, "reads_from": reads_from}


def node_status(node: Node) -> NodeStatus:
    """The snapshot of one node (its URL masked)."""
    s = node.state
    fit = s.up and (node.role is Role.PRIMARY or (s.in_recovery is not False and not s.lagging))
    return NodeStatus(
        name=node.name,
        role=node.role.value,
        server_role=None if s.in_recovery is None else ("replica" if s.in_recovery else "primary"),
        url=mask_url(node.url),
        healthy=fit,
        reason=s.reason,
        lag_seconds=s.lag_seconds,
        lag_bytes=s.lag_bytes,
        in_flight=s.in_flight,
        latency_ms=None if s.latency is None else round(s.latency * 1000, 3),
        last_error=s.last_error,
        server_version=s.server_version,
        sessions=s.sessions,
        checkout_failures=s.checkout_failures,
        ejections=s.ejections,
        retries=s.retries,
        failovers=s.failovers,
        weight=node.weight,
        checkout_histogram=tuple(s.checkout_counts),
        checkout_seconds=s.checkout_seconds,
        patroni_lag_bytes=s.patroni_lag_bytes,
    )
