"""Nodes: one database server each, with its engine, sessionmaker and live state."""

from __future__ import annotations

import bisect
import enum
import time
from dataclasses import dataclass, field

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

__all__ = ["CHECKOUT_BUCKETS", "Node", "NodeState", "Role", "mask_url"]

# Upper bounds (seconds) of the checkout-latency histogram, Prometheus style.
CHECKOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Role(enum.StrEnum):
    """What a node is configured as."""

    PRIMARY = "primary"
    REPLICA = "replica"


def mask_url(url: URL) -> str:
    """The URL as text with its password hidden, in the userinfo or the query."""
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True)


@dataclass(slots=True)
class NodeState:
    """What the router knows about a node right now. Mutated only by the router's loop.

    ``up`` is reachability (probes and request errors); ``eligible`` adds the rest
    of "fit to serve reads": in recovery, within the lag bounds, not an outlier.
    """

    up: bool = True
    in_recovery: bool | None = None
    lagging: bool = False
    slow: bool = False
    reason: str | None = None
    lag_seconds: float | None = None
    lag_bytes: int | None = None
    replay_lsn: int | None = None
    replay_checked_at: float = 0.0
    server_version: str | None = None
    in_flight: int = 0
    latency: float | None = None  # moving average of checkout round trips, seconds
    last_error: str | None = None
    last_error_at: float | None = None
    good_probes: int = 0
    # Bumped by every passive ejection: a probe that began before it cannot readmit.
    generation: int = 0
    down_since: float | None = None
    sessions: int = 0
    checkout_failures: int = 0
    ejections: int = 0
    retries: int = 0
    failovers: int = 0
    # Checkouts per CHECKOUT_BUCKETS bound (not cumulative), the last one for +Inf.
    checkout_counts: list[int] = field(default_factory=lambda: [0] * (len(CHECKOUT_BUCKETS) + 1))
    checkout_seconds: float = 0.0

    def mark_down(self, reason: str, error: str | None) -> bool:
        """Record a failure; True when this changed the node from up to down."""
        was_up = self.up
        self.up = False
        self.good_probes = 0
        self.generation += 1
        self.reason = reason
        if error is not None:
            self.last_error = error
            self.last_error_at = time.time()
        if was_up:
            self.down_since = time.monotonic()
            self.ejections += 1
        return was_up

    def observe_checkout(self, seconds: float) -> None:
        """One checkout (connection proven, transaction begun): histogram and average."""
        self.checkout_counts[bisect.bisect_left(CHECKOUT_BUCKETS, seconds)] += 1
        self.checkout_seconds += seconds
        self.observe_latency(seconds)

    def observe_latency(self, seconds: float) -> None:
        """Fold one checkout round trip into the moving average."""
        self.latency = seconds if self.latency is None else 0.8 * self.latency + 0.2 * seconds


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One database server.

    Attributes:
        name: ``primary``, ``replica-1``, ... unless configured.
        role: what it is configured as.
        url: its URL (render it with :func:`mask_url`; ``repr`` hides the password).
        engine: its ``AsyncEngine``; the user's own instrumentation can hook it.
        sessionmaker: sessions on this node (read-only transactions on a replica).
        reader_sessionmaker: read-only sessions on this node (the same as
            ``sessionmaker`` for a replica; for the primary, the one fallback reads use).
        weight: share of reads under the ``weighted`` strategy.
        state: live health and counters.
    """

    name: str
    role: Role
    url: URL
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    reader_sessionmaker: async_sessionmaker[AsyncSession]
    weight: float = 1.0
    state: NodeState = field(default_factory=NodeState)

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role.value} {mask_url(self.url)}>"
