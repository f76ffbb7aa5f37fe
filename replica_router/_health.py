"""Active health checks: one probe loop per node, on connections of its own.

Each probe asks a node whether it is in recovery and how far it has replayed
(``pg_last_wal_replay_lsn()``), or, on the primary, where its WAL is
(``pg_current_wal_lsn()``). Lag is measured against the primary's positions:

* bytes: the primary's newest position minus the replica's replay position;
* seconds: how long ago the primary first had WAL that the replica has not
  replayed yet. An idle primary therefore never makes a caught-up replica look
  behind, which ``now() - pg_last_xact_replay_timestamp()`` would.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._drivers import ProbeConnection
from ._nodes import Node, Role, Topology
from ._retry import fired_late
from ._settings import RouterSettings

__all__ = ["HealthChecker", "ProbeResult", "describe", "update_eligibility"]

logger = logging.getLogger("replica_router.health")

# Positions as bytes since 0/0 (an integer whatever the driver makes of pg_lsn).
_PROBE_SQL = """
SELECT pg_is_in_recovery(),
       pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                            ELSE pg_current_wal_lsn() END, '0/0')::bigint,
       current_setting('server_version'),
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')::bigint,
       pg_postmaster_start_time()::text,
       coalesce(host(inet_server_addr()), 'local') || ':' || coalesce(inet_server_port(), 0)
"""
# A replica must be this many times slower than the median of its peers (and
# slower than the floor) to count as an outlier.
OUTLIER_FACTOR = 4.0
OUTLIER_FLOOR = 0.010


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe saw."""

    in_recovery: bool
    lsn: int | None
    server_version: str
    latency: float
    # A replica's WAL received (None on a primary, or before streaming started).
    receive_lsn: int | None = None
    # When the server started: a new value means it restarted.
    started: str | None = None
    # Which server answered (address:port): a primary URL over several hosts moves.
    server: str | None = None


class _PrimaryHistory:
    """The primary's WAL positions and when each was first seen, newest last."""

    __slots__ = ("_limit", "_lsns", "_times")

    def __init__(self, limit: int = 4096) -> None:
        self._lsns: deque[int] = deque()
        self._times: deque[float] = deque()
        self._limit = limit

    def clear(self) -> None:
        """Forget every position: the primary's WAL is another now (it restarted and
        lost its unflushed tail, or another server is the primary)."""
        self._lsns.clear()
        self._times.clear()

    def add(self, lsn: int, at: float) -> None:
        if self._lsns and lsn <= self._lsns[-1]:
            return
        self._lsns.append(lsn)
        self._times.append(at)
        if len(self._lsns) > self._limit:
            self._lsns.popleft()
            self._times.popleft()

    @property
    def newest(self) -> int | None:
        return self._lsns[-1] if self._lsns else None

    def lag(self, replay_lsn: int, now: float, upto: int | None = None) -> tuple[int, float]:
        """Bytes and seconds a replica at ``replay_lsn`` is behind the newest position,
        or behind ``upto`` if that is older (WAL that no replica can have yet)."""
        newest = self.newest
        if newest is not None and upto is not None:
            newest = min(newest, upto)
        if newest is None or replay_lsn >= newest:
            return 0, 0.0
        # The first position the replica lacks was on the primary since this time.
        index = bisect.bisect_right(self._lsns, replay_lsn)
        return newest - replay_lsn, max(0.0, now - self._times[index])


def update_eligibility(replicas: Sequence[Node], settings: RouterSettings) -> None:
    """Recompute ``lagging`` and ``slow`` from the latest observations, log changes."""
    latencies = [n.state.latency for n in replicas if n.state.up and n.state.latency is not None]
    median = statistics.median(latencies) if len(latencies) >= 2 else None
    for node in replicas:
        state = node.state
        # Patroni's figure (a member it discovered) counts beside the probes' own.
        by_patroni = (state.patroni_lag_bytes or 0) > settings.max_lag_bytes
        lagging = (
            (state.lag_seconds or 0.0) > settings.max_lag_seconds
            or (state.lag_bytes or 0) > settings.max_lag_bytes
            or by_patroni
        )
        if lagging != state.lagging:
            state.lagging = lagging
            if lagging:
                logger.warning(
                    "replica %s is lagging (%.1f s, %d bytes%s); it serves no reads",
                    node.name,
                    state.lag_seconds or 0.0,
                    state.lag_bytes or 0,
                    f"; Patroni reports {state.patroni_lag_bytes} bytes" if by_patroni else "",
                )
            else:
                logger.info("replica %s caught up; it serves reads again", node.name)
        slow = (
            median is not None
            and state.latency is not None
            and state.latency > OUTLIER_FLOOR
            and state.latency > OUTLIER_FACTOR * median
        )
        if slow != state.slow:
            state.slow = slow
            if slow:
                logger.warning(
                    "replica %s is slow (%.1f ms, peers' median %.1f ms); it gets reads "
                    "only when no peer can take them",
                    node.name,
                    (state.latency or 0.0) * 1000,
                    (median or 0.0) * 1000,
                )
            else:
                logger.info("replica %s is no longer slow", node.name)
        state.reason = _reason(node)


def _reason(node: Node) -> str | None:
    state = node.state
    if not state.up:
        return state.reason if state.reason and state.reason.startswith("down") else "down"
    if node.role is Role.REPLICA and state.in_recovery is False:
        return "not in recovery: this server is a primary, reads never go to it"
    if state.lagging:
        return "lagging"
    if state.slow:
        return "slow"
    return None


class HealthChecker:
    """Probes every node on an interval, in parallel, each on a connection of its own.

    The probe connections never come from the nodes' request pools, so a busy or
    tiny pool never delays a probe and a probe never takes a request's slot.
    """

    __slots__ = (
        "_connect_args",
        "_connections",
        "_history",
        "_on_primary_demoted",
        "_primary_live",
        "_primary_server",
        "_primary_started",
        "_settings",
        "_stalled",
        "_stopping",
        "_tasks",
        "_topology",
        "probes",
    )

    def __init__(
        self,
        topology: Topology,
        settings: RouterSettings,
        *,
        connect_args: dict[str, Any] | None = None,
        on_primary_demoted: Callable[[str], None] | None = None,
    ) -> None:
        self._on_primary_demoted = on_primary_demoted
        self._topology = topology
        self._settings = settings
        self._connect_args = dict(connect_args or {})
        self._connections: dict[Node, ProbeConnection] = {}
        self._history = _PrimaryHistory()
        self._primary_started: str | None = None
        self._primary_server: str | None = None
        # The last probe of the primary succeeded and no request found it down since:
        # replica lag is measured against its WAL (else against what replicas received).
        self._primary_live = False
        self._tasks: dict[Node, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        # Nodes whose last probe timed out on a blocked event loop (not held against them).
        self._stalled: set[Node] = set()
        self.probes = 0

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not self._stopping.is_set()

    @property
    def primary_lsn(self) -> int | None:
        """The newest WAL position the primary reported."""
        return self._history.newest

    def node_down(self, node: Node) -> None:
        """A request marked ``node`` down: recompute which replicas are fit."""
        if node.role is Role.REPLICA:
            update_eligibility(self._topology.replicas, self._settings)
        else:
            self._primary_live = False

    def observe_primary_lsn(self, lsn: int) -> None:
        """A primary WAL position seen outside the probes (after a writer's COMMIT)."""
        self._history.add(lsn, time.monotonic())

    async def start(self) -> None:
        """Probe every node once, then keep probing in the background."""
        self._stopping.clear()
        await self.probe_all()
        for node in self._topology.nodes:
            self._spawn(node)

    def _spawn(self, node: Node) -> None:
        task = asyncio.create_task(self._loop(node), name=f"replica-router probe {node.name}")
        self._tasks[node] = task

    def sync(self) -> None:
        """Follow a changed topology: probe new nodes on the interval like the others
        (the caller probed them once already); stop probing nodes that left."""
        current = set(self._topology.nodes)
        for node in [node for node in self._connections if node not in current]:
            self._drop_connection(node)
        if not self.running:
            return
        for node in [node for node in self._tasks if node not in current]:
            self._tasks.pop(node).cancel()
        for node in self._topology.nodes:
            if node not in self._tasks:
                self._spawn(node)

    async def stop(self) -> None:
        """Stop probing and close the probe connections."""
        self._stopping.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        connections = list(self._connections.values())
        self._connections.clear()
        for conn in connections:
            conn.terminate()

    async def probe_all(self) -> None:
        """One round: the primary first (replica lag is measured against it), then replicas."""
        topology = self._topology
        await self.probe(topology.primary)
        await asyncio.gather(*(self.probe(n) for n in topology.replicas))

    async def _loop(self, node: Node) -> None:
        interval = self._settings.health_interval
        while not self._stopping.is_set():
            # Jitter spreads probes of many workers over the interval.
            delay = interval * random.uniform(0.8, 1.2)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            await self.probe(node)

    async def probe(self, node: Node) -> None:
        """Probe one node and fold the result into its state."""
        state = node.state
        generation = state.generation
        timeout = self._settings.health_timeout
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(self._query(node), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._drop_connection(node)
            if (
                isinstance(exc, TimeoutError)
                and node not in self._stalled
                and fired_late(started, timeout)
            ):
                # The loop was blocked past the bound: the next probe decides. Only
                # once in a row, so a loop that is always late cannot hide a dead node.
                self._stalled.add(node)
                logger.info("a blocked event loop cut the probe of %s", node.name)
                return
            self._stalled.discard(node)
            self._failed(node, exc)
            return
        finally:
            self.probes += 1
        self._stalled.discard(node)
        self._succeeded(node, result, generation)

    async def _query(self, node: Node) -> ProbeResult:
        conn = self._connections.get(node)
        if conn is None or conn.is_closed():
            conn = await node.driver.connect(
                node.url,
                self._connect_args,
                connect_timeout=self._settings.health_timeout,
                application_name="replica-router-health",
            )
            self._connections[node] = conn
        started = time.perf_counter()
        row = await conn.fetch_row(_PROBE_SQL)
        latency = time.perf_counter() - started
        lsn, received = row[1], row[3]
        return ProbeResult(
            in_recovery=bool(row[0]),
            lsn=int(lsn) if lsn is not None else None,
            server_version=str(row[2]),
            latency=latency,
            receive_lsn=int(received) if received is not None else None,
            started=str(row[4]),
            server=str(row[5]),
        )

    def _drop_connection(self, node: Node) -> None:
        conn = self._connections.pop(node, None)
        if conn is not None:
            conn.terminate()

    def _failed(self, node: Node, exc: BaseException) -> None:
        state = node.state
        if node.role is Role.PRIMARY:
            self._primary_live = False
        message = describe(exc)
        if state.mark_down(f"down: {message}", message):
            logger.warning("%s %s is down: %s", node.role.value, node.name, message)

    def _succeeded(self, node: Node, result: ProbeResult, generation: int) -> None:
        state = node.state
        now = time.monotonic()
        state.server_version = result.server_version
        state.observe_latency(result.latency)
        if state.in_recovery is not None and state.in_recovery != result.in_recovery:
            logger.warning(
                "%s %s changed role: it is %s now",
                node.role.value,
                node.name,
                "in recovery (a replica)" if result.in_recovery else "not in recovery (a primary)",
            )
            if node.role is Role.PRIMARY and result.in_recovery and self._on_primary_demoted:
                self._on_primary_demoted("the health probe found it in recovery")
        state.in_recovery = result.in_recovery
        if node.role is Role.PRIMARY:
            if not result.in_recovery and self._primary_server not in (None, result.server):
                # However it was noticed (25006, a probe, a reconnect), this is when the
                # writable host changed: counted once, here.
                state.failovers += 1
                logger.warning(
                    "failover: primary %s is now %s (was %s)",
                    node.name,
                    result.server,
                    self._primary_server,
                )
            if not result.in_recovery:
                self._primary_server = result.server
            if self._primary_started not in (None, result.started):
                # A crash loses the WAL it had not written out: positions seen before
                # would make every replica look behind until new WAL passed them.
                logger.info("primary %s restarted; its WAL history starts anew", node.name)
                self._history.clear()
            self._primary_started = result.started
            if result.lsn is not None and not result.in_recovery:
                self._history.add(result.lsn, now)
            self._primary_live = not result.in_recovery and generation == state.generation
            state.lag_bytes, state.lag_seconds = 0, 0.0
        elif result.lsn is not None:
            state.replay_lsn = result.lsn
            state.receive_lsn = result.receive_lsn
            state.replay_checked_at = now
            self._measure_lag(node, now)
        # A probe that began before a passive ejection proves nothing about now.
        if not state.up and generation == state.generation:
            state.good_probes += 1
            needed = 1 if node.role is Role.PRIMARY else self._settings.readmit_after
            if state.good_probes >= needed:
                state.up = True
                state.down_since = None
                logger.info("%s %s is up again", node.role.value, node.name)
        if node.role is Role.REPLICA:
            update_eligibility(self._topology.replicas, self._settings)
        elif not state.up:
            state.reason = "down"
        else:
            state.reason = None if result.in_recovery is False else "in recovery: not writable"

    def _measure_lag(self, replica: Node, now: float) -> None:
        """A replica's lag: behind the primary while it is up; while it is down, behind
        what the replicas received, which is all they could have.

        A dead or frozen primary never sends the WAL it had last: measured against it,
        every replica would look further behind each second, and reads would fall back
        to the very primary that is gone. A replica counts as caught up then only if it
        was within the bounds when the primary was last seen up.
        """
        state = replica.state
        assert state.replay_lsn is not None
        primary = self._topology.primary.state
        settings = self._settings
        if self._primary_live:
            state.lag_bytes, state.lag_seconds = self._history.lag(state.replay_lsn, now)
            if (
                state.lag_seconds <= settings.max_lag_seconds
                and state.lag_bytes <= settings.max_lag_bytes
            ):
                state.caught_up_at = now
            return
        received = [
            max(s.receive_lsn or 0, s.replay_lsn or 0)
            for s in (n.state for n in self._topology.replicas)
            if s.up and s.in_recovery and s.replay_lsn is not None
        ]
        upto = max(received, default=state.replay_lsn)
        state.lag_bytes, state.lag_seconds = self._history.lag(state.replay_lsn, now, upto)
        # How long before the primary went away this replica was last fit (if ever).
        gone = primary.down_since if primary.down_since is not None else now
        stale = gone - (state.caught_up_at or float("-inf"))
        state.lag_seconds = max(state.lag_seconds, stale)


def describe(exc: BaseException) -> str:
    """A short, password-free description of a probe failure."""
    if isinstance(exc, TimeoutError):
        return "probe timed out"
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    # asyncpg's messages name host and port at most; never the DSN.
    return f"{name}: {text}"[:200] if text else name
