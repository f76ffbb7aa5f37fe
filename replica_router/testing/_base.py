"""What every cluster backend shares: nodes by name, URLs, replay controls, psql output.

:class:`~replica_router.testing.LocalCluster` (local binaries) and
:class:`~replica_router.testing.containers.DockerCluster` (containers) differ in how
they start, stop and reach servers; the rest of their interface is written once here,
on top of a few methods each backend provides.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar
from urllib.parse import quote

from replica_router.testing import _watchdog

__all__ = ["DRIVERS", "ClusterBase", "ClusterError", "Driver", "NodeLike", "Role", "StopMode"]

logger = logging.getLogger("replica_router.testing.cluster")

Role = Literal["primary", "replica"]
# The driver a cluster's URLs name (``postgresql+asyncpg://`` or ``postgresql+psycopg://``).
Driver = Literal["asyncpg", "psycopg"]
DRIVERS: tuple[Driver, ...] = ("asyncpg", "psycopg")
StopMode = Literal["smart", "fast", "immediate"]

# How each shutdown mode is asked of a postmaster, and how long each may take
# before the next, harsher one (then SIGKILL).
STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
ESCALATION: tuple[tuple[str, float], ...] = (
    ("smart", 30.0),
    ("fast", 30.0),
    ("immediate", 10.0),
)

# Settings every node gets, whatever runs it.
BASE_SETTINGS: dict[str, str] = {
    "max_connections": "100",
    "shared_buffers": "16MB",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "fsync": "off",
    "full_page_writes": "off",
    # Replicas reconnect to a restarted primary this fast (default 5s).
    "wal_retrieve_retry_interval": "500ms",
    "logging_collector": "off",
}

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_FIELD_SEP = "\x1f"
_RECORD_SEP = "\x1e"


class ClusterError(RuntimeError):
    """A cluster operation failed; the message includes the server log's tail when useful."""


class NodeLike(Protocol):
    """What the shared code needs of a node."""

    name: str
    role: Role
    port: int


N = TypeVar("N", bound=NodeLike)


def stop_steps(mode: str) -> list[tuple[str, float]]:
    """The shutdown modes to try in turn, from ``mode`` on, with their grace periods."""
    if mode not in STOP_SIGNALS:
        msg = f"mode must be 'smart', 'fast' or 'immediate', got {mode!r}"
        raise ValueError(msg)
    steps = list(ESCALATION)
    while steps[0][0] != mode:
        steps.pop(0)
    return steps


def check_arguments(
    replicas: int,
    *,
    user: str | None,
    password: str | None,
    database: str,
    server_settings: Mapping[str, str] | None,
) -> dict[str, str]:
    """Validate a cluster's constructor arguments; return a copy of ``server_settings``."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        msg = f"replicas must be an integer >= 0, got {replicas!r}"
        raise ValueError(msg)
    if user is not None and not user:
        msg = "user must be a non-empty string"
        raise ValueError(msg)
    if not database:
        msg = "database must be a non-empty string"
        raise ValueError(msg)
    if password is not None and not password:
        msg = "password must be a non-empty string (or None for a random one)"
        raise ValueError(msg)
    settings = dict(server_settings or {})
    for key in settings:
        if not _SETTING_NAME.match(key):
            msg = f"server_settings: {key!r} is not a valid setting name"
            raise ValueError(msg)
    return settings


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def check_addresses(addresses: Sequence[str] | None, replicas: int) -> tuple[str, ...]:
    """Validate ``replica_addresses``: one distinct IPv4 loopback address per replica."""
    if addresses is None:
        return ()
    found = tuple(addresses)
    if isinstance(addresses, str) or len(found) != replicas:
        msg = f"replica_addresses must list one address per replica ({replicas}), got {addresses!r}"
        raise ValueError(msg)
    for address in found:
        try:
            loopback = ipaddress.ip_address(address) in ipaddress.ip_network("127.0.0.0/8")
        except ValueError:
            loopback = False
        if not loopback:
            msg = f"replica_addresses: {address!r} is not an IPv4 loopback address (127.x.y.z)"
            raise ValueError(msg)
    if len(set(found)) != len(found):
        msg = f"replica_addresses must be distinct, got {found!r}"
        raise ValueError(msg)
    return found


def free_shared_port(addresses: Sequence[str], attempts: int = 100) -> int:
    """A TCP port that is free on every one of ``addresses`` now."""
    for _ in range(attempts):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            first.bind((addresses[0], 0))
            port: int = first.getsockname()[1]
            try:
                for address in addresses[1:]:
                    other = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    other.bind((address, port))
            except OSError:
                continue
            return port
    msg = f"no TCP port is free on all of {list(addresses)}"
    raise ClusterError(msg)


def conf_value(value: str) -> str:
    """A ``postgresql.conf`` value, quoted."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def start_watchdog(base: Path) -> subprocess.Popen[bytes]:
    """The process that kills a cluster's servers under ``base`` once its owner is gone
    (the pipe to it closes), see ``_watchdog``."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", _watchdog.__file__, str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def psql_args(user: str, database: str, sql: str) -> list[str]:
    """``psql`` options (after the connection target) whose output :func:`parse_rows` reads."""
    return [
        "-U",
        user,
        "-d",
        database,
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-F",
        _FIELD_SEP,
        "-R",
        _RECORD_SEP,
        "-c",
        sql,
    ]


def parse_rows(stdout: str) -> list[tuple[str, ...]]:
    """The rows ``psql`` printed with :func:`psql_args`, as tuples of text."""
    out = stdout.removesuffix("\n")
    if not out:
        return []
    return [tuple(record.split(_FIELD_SEP)) for record in out.split(_RECORD_SEP)]


_LIVE: set[ClusterBase[Any]] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_clusters() -> None:
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for cluster in clusters:
        if cluster._owner_pid == os.getpid():
            try:
                cluster.stop()
            except Exception:
                logger.warning("could not stop a cluster at exit", exc_info=True)


class ClusterBase(abc.ABC, Generic[N]):
    """A primary and streaming replicas with fault controls; backends fill in the servers."""

    __slots__ = ()

    # Set by every backend's constructor.
    user: str
    password: str
    database: str
    # Which driver ``url()`` names; the pytest plugin sets it per test.
    driver: Driver
    _owner_pid: int

    # -- what a backend provides -------------------------------------------------------------

    @property
    @abc.abstractmethod
    def nodes(self) -> list[N]:
        """Every node, the primary first."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Create and start the primary and the replicas; a no-op when started."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop and remove every server."""

    @abc.abstractmethod
    def is_running(self, node: N | str) -> bool:
        """Whether the node's server is running."""

    @abc.abstractmethod
    def stop_node(self, node: N | str, mode: StopMode = "fast") -> None:
        """Shut a node down (``smart``, ``fast`` or ``immediate``), escalating if it hangs."""

    @abc.abstractmethod
    def _spawn(self, node: N) -> None:
        """Start a stopped node's server, without waiting for it."""

    @abc.abstractmethod
    def _wait_ready(self, node: N) -> None:
        """Return once a node accepts connections; raise ClusterError if it cannot."""

    @abc.abstractmethod
    def _promote(self, node: N, timeout: float) -> None:
        """Ask a replica's server to leave recovery."""

    @abc.abstractmethod
    def _log_tail(self, node: N) -> str:
        """The last lines of a node's server log, for error messages."""

    @abc.abstractmethod
    def _psql(self, node: N, args: list[str], timeout: float) -> str:
        """Run ``psql`` with ``args`` against a running node; return what it printed.

        Raises:
            ClusterError: psql failed or timed out.
        """

    @abc.abstractmethod
    def _host(self, node: N) -> str:
        """The host clients connect to for ``node``."""

    # -- nodes and URLs ----------------------------------------------------------------------

    @property
    def primary(self) -> N:
        """The node started as the primary (named ``primary``)."""
        return self.nodes[0]

    @property
    def replicas(self) -> list[N]:
        """The nodes started as replicas, in order (``replica-1``, ...)."""
        return self.nodes[1:]

    @property
    def primary_url(self) -> str:
        """SQLAlchemy URL of the primary (``postgresql+asyncpg://...`` by default)."""
        return self.url(self.primary)

    @property
    def replica_urls(self) -> list[str]:
        """SQLAlchemy URLs of the replicas, in order."""
        return [self.url(node) for node in self.replicas]

    def node(self, node: N | str) -> N:
        """Return the node given by itself or by name.

        Raises:
            KeyError: No node has that name.
        """
        if not isinstance(node, str):
            return node
        nodes = self.nodes
        for candidate in nodes:
            if candidate.name == node:
                return candidate
        msg = f"no node named {node!r}; nodes are {[n.name for n in nodes]}"
        raise KeyError(msg)

    def url(self, node: N | str) -> str:
        """Return the SQLAlchemy URL of a node, for the cluster's ``driver``."""
        return f"postgresql+{self.driver}" + self.dsn(node).removeprefix("postgresql")

    def dsn(self, node: N | str) -> str:
        """Return the libpq/asyncpg URL (``postgresql://...``) of a node."""
        target = self.node(node)
        credentials = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        host = self._host(target)
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        return f"postgresql://{credentials}@{host}:{target.port}/{quote(self.database, safe='')}"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _register(self) -> None:
        """Stop this cluster at interpreter exit if its owner has not."""
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _unregister(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    # -- SQL and fault controls --------------------------------------------------------------

    def execute(
        self,
        node: N | str,
        sql: str,
        *,
        database: str | None = None,
        timeout: float = 60.0,
    ) -> list[tuple[str, ...]]:
        """Run SQL on a node with ``psql`` and return the last result's rows as text.

        Synchronous (a subprocess), so it is safe to call from inside an event loop.
        ``NULL`` comes back as ``""``, booleans as ``"t"``/``"f"``.

        Args:
            node: The node or its name.
            sql: One or more statements; rows of the last one are returned.
            database: Defaults to the cluster's database.
            timeout: Seconds before giving up.

        Raises:
            ClusterError: The node is not running or the SQL failed.
        """
        target = self.node(node)
        if not self.is_running(target):
            msg = f"{target.name} is not running"
            raise ClusterError(msg)
        args = psql_args(self.user, database or self.database, sql)
        return parse_rows(self._psql(target, args, timeout))

    def start_node(self, node: N | str, wait: bool = True) -> None:
        """Start a stopped node; with ``wait``, return once it accepts connections."""
        target = self.node(node)
        if self.is_running(target):
            return
        self._spawn(target)
        if wait:
            self._wait_ready(target)

    def restart_node(self, node: N | str) -> None:
        """Fast shutdown, then start, of one node."""
        self.stop_node(node)
        self.start_node(node)

    def pause_replay(self, node: N | str) -> None:
        """Pause WAL replay on a replica (``pg_wal_replay_pause()``): it starts lagging."""
        self.execute(self._replica(node), "SELECT pg_wal_replay_pause()")

    def resume_replay(self, node: N | str) -> None:
        """Resume WAL replay on a replica (``pg_wal_replay_resume()``)."""
        self.execute(self._replica(node), "SELECT pg_wal_replay_resume()")

    def promote(self, node: N | str, timeout: float = 60.0) -> None:
        """Promote a replica and wait until it leaves recovery.

        ``LocalCluster`` runs ``pg_ctl promote``, ``DockerCluster`` ``pg_promote()``.
        The node's ``role`` becomes ``"primary"``; the other replicas keep following
        the original primary.
        """
        target = self._replica(node)
        self._promote(target, timeout)
        deadline = time.monotonic() + timeout
        while self.execute(target, "SELECT pg_is_in_recovery()") != [("f",)]:
            if time.monotonic() > deadline:
                msg = f"{target.name} still in recovery after promotion\n{self._log_tail(target)}"
                raise ClusterError(msg)
            time.sleep(0.02)
        target.role = "primary"
        logger.info("%s promoted", target.name)

    def wait_for_replay(self, timeout: float = 30.0) -> None:
        """Wait until every running, unpaused replica has replayed the primary's current LSN.

        Raises:
            ClusterError: No primary is running, or a replica did not catch up in time.
        """
        sources = [n for n in self.nodes if n.role == "primary" and self.is_running(n)]
        if not sources:
            msg = "wait_for_replay: no primary is running"
            raise ClusterError(msg)
        lsn = self.execute(sources[0], "SELECT pg_current_wal_lsn()")[0][0]
        query = (
            "SELECT pg_is_wal_replay_paused(), "
            f"coalesce(pg_last_wal_replay_lsn() >= {sql_literal(lsn)}::pg_lsn, false)"
        )
        pending = [n for n in self.nodes if n.role == "replica" and self.is_running(n)]
        deadline = time.monotonic() + timeout
        while pending:
            pending = [n for n in pending if "t" not in self.execute(n, query)[0]]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(n.name for n in pending)
                msg = f"replicas {names} did not replay {lsn} within {timeout}s"
                raise ClusterError(msg)
            time.sleep(0.02)

    # -- for backends ------------------------------------------------------------------------

    def _replica(self, node: N | str) -> N:
        target = self.node(node)
        if target.role != "replica":
            msg = f"{target.name} is not a replica"
            raise ClusterError(msg)
        return target
