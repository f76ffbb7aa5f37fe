"""Nodes: one database server each, with its engine, sessionmakers and live state."""

from __future__ import annotations

import asyncio
import bisect
import enum
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import QueuePool

from ._drivers import AsyncpgDriver, Driver, driver_for
from ._exceptions import ConfigurationError, ReplicaPromotedError
from ._pool import FairAsyncQueuePool
from ._settings import RouterSettings
from ._urls import mask_url, parse_url, split_replica_options

__all__ = [
    "CHECKOUT_BUCKETS",
    "Node",
    "NodeState",
    "Role",
    "Topology",
    "build_node",
    "build_topology",
    "dispose_node",
    "mask_url",
    "read_only_hook",
]

logger = logging.getLogger("replica_router")

# Upper bounds (seconds) of the checkout-latency histogram, Prometheus style.
CHECKOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Role(enum.StrEnum):
    """What a node is configured as."""

    PRIMARY = "primary"
    REPLICA = "replica"


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
    # The lag Patroni's REST API last reported for a member it discovered (bytes).
    patroni_lag_bytes: int | None = None
    replay_lsn: int | None = None
    receive_lsn: int | None = None
    replay_checked_at: float = 0.0
    # When a probe last found this replica within the lag bounds of a live primary.
    caught_up_at: float | None = None
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
        driver: the driver seam for its URL.
    """

    name: str
    role: Role
    url: URL
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    reader_sessionmaker: async_sessionmaker[AsyncSession]
    weight: float = 1.0
    state: NodeState = field(default_factory=NodeState)
    driver: Driver = field(default_factory=AsyncpgDriver, repr=False)

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role.value} {mask_url(self.url)}>"


@dataclass(slots=True, eq=False)
class Topology:
    """The nodes a router routes over, shared by its parts."""

    primary: Node
    replicas: tuple[Node, ...]

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The primary, then the replicas."""
        return (self.primary, *self.replicas)


def build_topology(
    primary_url: str | URL,
    replica_urls: Sequence[str | URL],
    settings: RouterSettings,
    engine_options: Mapping[str, Any],
    session_options: Mapping[str, Any],
) -> Topology:
    """Every node of a router, from its URLs (checked, naming the parameter)."""
    if isinstance(replica_urls, str | URL):
        raise ConfigurationError("replica_urls must be a sequence of URLs, not one URL")
    url = parse_url(primary_url, what="primary_url")
    primary = build_node(
        "primary", Role.PRIMARY, url, 1.0, settings, engine_options, session_options
    )
    replicas: list[Node] = []
    for index, raw in enumerate(replica_urls, start=1):
        what = f"replica_urls[{index - 1}]"
        url, name, weight = split_replica_options(parse_url(raw, what=what), what=what)
        name = name or f"replica-{index}"
        replicas.append(
            build_node(name, Role.REPLICA, url, weight, settings, engine_options, session_options)
        )
    names = [primary.name, *(r.name for r in replicas)]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"node names must be unique, got {names}")
    return Topology(primary, tuple(replicas))


def build_node(
    name: str,
    role: Role,
    url: URL,
    weight: float,
    settings: RouterSettings,
    engine_options: Mapping[str, Any],
    session_options: Mapping[str, Any],
) -> Node:
    """A node with its own engine (a first-come-first-served pool unless the user
    passed ``poolclass``) and sessionmakers; nothing connects yet."""
    s = settings
    driver = driver_for(url)
    options: dict[str, Any] = {"pool_recycle": s.pool_recycle}
    poolclass = engine_options.get("poolclass", FairAsyncQueuePool)
    if issubclass(poolclass, QueuePool):
        # Sizing applies to queue pools only (NullPool and friends refuse it).
        options.update(
            pool_size=s.pool_size, max_overflow=s.max_overflow, pool_timeout=s.pool_timeout
        )
    options.update(engine_options, poolclass=poolclass)
    connect_args = dict(options.get("connect_args", {}))
    if role is Role.REPLICA and s.read_timeout is not None:
        connect_args = {**driver.read_timeout_args(s.read_timeout, s.pooler), **connect_args}
    options["connect_args"] = driver.connect_args(
        connect_args,
        timeout=s.connect_timeout,
        application_name="replica-router",
        pooler=s.pooler,
    )
    engine = create_async_engine(url, **options)
    event.listen(engine.sync_engine, "handle_error", _timeout_hook(driver))
    if role is Role.REPLICA:
        # A replica that turns out to be writable must still refuse writes: every
        # transaction is READ ONLY, set once per connection.
        event.listen(engine.sync_engine, "connect", read_only_hook(driver))
    session_kwargs: dict[str, Any] = {"expire_on_commit": False, **session_options}
    # A session used after its request (a background task, a stream) must fail
    # loudly instead of silently reconnecting into a leaked transaction.
    session_kwargs["close_resets_only"] = False
    maker = async_sessionmaker(engine, **session_kwargs)
    if role is Role.REPLICA:
        reader_maker = maker
    else:
        readonly = engine.execution_options(postgresql_readonly=True)
        reader_maker = async_sessionmaker(readonly, **session_kwargs)
    node = Node(name, role, url, engine, maker, reader_maker, weight, NodeState(), driver)
    if role is Role.REPLICA:
        _guard_statements(node)
    return node


_READ_ONLY_HOOKS: dict[str, Any] = {}


def read_only_hook(driver: Driver) -> Any:
    """The ``connect`` listener that makes a driver's connections READ ONLY (one per
    driver, so it can be found with ``event.contains``)."""
    hook = _READ_ONLY_HOOKS.get(driver.name)
    if hook is None:

        def read_only_connection(dbapi_connection: Any, record: Any) -> None:
            driver.set_read_only(dbapi_connection)

        hook = _READ_ONLY_HOOKS[driver.name] = read_only_connection
    return hook


def _guard_statements(node: Node) -> None:
    """Refuse the result of every statement on this replica that ran on a server
    promoted since its session began: the server reports ``in_hot_standby = off``
    with the first answer after its promotion, so the result is discarded before it
    reaches anyone, and no read is served by a node that left recovery (the checkout
    that proved the session had seen the node in recovery).

    Dialect events (``do_execute``), not ``after_cursor_execute``: a connection event
    listener makes SQLAlchemy dispatch every connection event of every statement
    (about 90 more Python calls per request, measured), a dialect one only this. The
    driver's connection is the cursor's own (SQLAlchemy's asyncio cursors keep it as
    ``_connection``): the way through the execution context costs five Python calls."""
    dialect = node.engine.sync_engine.dialect
    in_hot_standby = node.driver.in_hot_standby
    state = node.state

    def promoted() -> NoReturn:
        state.in_recovery = False
        raise ReplicaPromotedError(
            f"replica {node.name} left recovery (promoted) during this read; retry"
        )

    def execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        dialect.do_execute(cursor, statement, parameters, context)
        if in_hot_standby(cursor._connection) is False:
            promoted()
        return True

    def execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
        dialect.do_execute_no_params(cursor, statement, context)
        if in_hot_standby(cursor._connection) is False:
            promoted()
        return True

    event.listen(node.engine.sync_engine, "do_execute", execute)
    event.listen(node.engine.sync_engine, "do_execute_no_params", execute_no_params)


def _timeout_hook(driver: Driver) -> Any:
    """``handle_error``: a statement cut by the driver's timer (a server that may be
    frozen) drops its connection at once; SQLAlchemy would otherwise wait 2 s for a
    goodbye that a frozen server never answers before the error reaches anyone."""

    def abort_on_timeout(context: Any) -> None:
        if isinstance(context.original_exception, TimeoutError) and context.connection:
            try:
                driver.abort(context.connection.connection)
            except Exception:
                logger.debug("dropping a timed-out connection failed", exc_info=True)

    return abort_on_timeout


async def dispose_node(node: Node, seconds: float) -> None:
    """Close a node's pool within ``seconds``; a frozen server cannot hang shutdown."""
    try:
        await asyncio.wait_for(node.engine.dispose(), seconds)
    except TimeoutError:
        # A stopped (SIGSTOP) server never answers the goodbye.
        logger.warning("%s %s did not close within %.1f s", node.role.value, node.name, seconds)
    except Exception:
        logger.warning("closing %s %s failed", node.role.value, node.name, exc_info=True)
