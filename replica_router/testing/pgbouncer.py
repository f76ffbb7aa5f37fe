"""PgBouncer in transaction pooling mode in front of a :class:`LocalCluster`'s servers.

Applications often reach PostgreSQL through PgBouncer with ``pool_mode =
transaction``: a client holds a server connection only for the length of a
transaction, so session state (``SET``, named prepared statements) does not
follow it from one transaction to the next. ``PgBouncer`` runs a real one
per fronted server, each on a free port of 127.0.0.1 with its own URL, so a
test can point the router at "node X through PgBouncer".

The binary is looked up in this order:

1. the ``REPLICA_ROUTER_PGBOUNCER`` environment variable (a path to it);
2. ``pgbouncer`` on ``PATH``;
3. ``/usr/sbin/pgbouncer`` (where Debian and Ubuntu put it).

PgBouncer refuses to run as root: started as root, it runs as the cluster's
server user (see ``REPLICA_ROUTER_PG_USER``). Its configuration, password
file and log live in a temporary directory that is removed on
:meth:`PgBouncer.stop`. No process outlives its owner: ``stop()`` runs from
the context manager, from ``atexit``, and failing both, a watchdog process
SIGKILLs every process working in that directory when the owner dies.

Example::

    from replica_router.testing import LocalCluster, PgBouncer

    with LocalCluster(replicas=1) as cluster, PgBouncer(cluster) as bouncer:
        # Named prepared statements do not survive transaction pooling; without
        # its statement cache asyncpg uses the unnamed one, parsed at each run.
        engine = create_async_engine(
            bouncer.primary_url, connect_args={"statement_cache_size": 0}
        )
        bouncer.admin("SHOW POOLS", node="primary")
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from replica_router.testing import _watchdog
from replica_router.testing._base import (
    ClusterError,
    free_port,
    parse_rows,
    psql_args,
    start_watchdog,
)
from replica_router.testing._binaries import RunAs, server_user
from replica_router.testing._pgbouncer_binary import (
    PgBouncerNotFoundError,
    find_pgbouncer,
    ids,
    version,
)
from replica_router.testing.cluster import ClusterNode, LocalCluster

__all__ = ["DEFAULT_SETTINGS", "PgBouncer", "PgBouncerNotFoundError", "find_pgbouncer"]

logger = logging.getLogger(__name__)

# What every bouncer gets unless ``settings`` says otherwise.
DEFAULT_SETTINGS: dict[str, str] = {
    "pool_mode": "transaction",
    "max_client_conn": "200",
    "default_pool_size": "20",
    # A plain password in the auth file serves SCRAM both ways (PgBouncer >= 1.14).
    "auth_type": "scram-sha-256",
    # PgBouncer refuses a client that sends a startup parameter it does not track;
    # these two it drops instead: pgJDBC sends extra_float_digits, libpq sends
    # options when PGOPTIONS or options= is set. (asyncpg and psycopg send neither
    # by default; asyncpg's server_settings beyond application_name, DateStyle,
    # TimeZone and the like are refused.)
    "ignore_startup_parameters": "extra_float_digits,options",
    # No reset between clients: in transaction mode there is no session to reset.
    "server_reset_query": "",
    # Retry a server that refused a login after 1 s, not 15: tests restart servers.
    "server_login_retry": "1",
}

# Set by PgBouncer itself: where it listens, whom it trusts.
_FIXED = frozenset(
    {"listen_addr", "listen_port", "unix_socket_dir", "auth_file", "admin_users", "logfile"}
)
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_READY_TIMEOUT = 30.0
_STOP_GRACE = 10.0


def _ini_quote(value: str) -> str:
    """A double-quoted name for PgBouncer's auth file (quotes doubled)."""
    return '"' + value.replace('"', '""') + '"'


@dataclass(eq=False, slots=True)
class _Bouncer:
    """One pgbouncer process, fronting one server."""

    node: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_offset: int = 0

    @property
    def config(self) -> Path:
        return self.directory / "pgbouncer.ini"

    @property
    def log_file(self) -> Path:
        return self.directory / "pgbouncer.log"

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_file, "rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")
        except OSError:
            return ""


_LIVE: set[PgBouncer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_bouncers() -> None:
    with _LIVE_LOCK:
        bouncers = list(_LIVE)
    for bouncer in bouncers:
        if bouncer._owner_pid == os.getpid():
            try:
                bouncer.stop()
            except Exception:
                logger.warning("could not stop PgBouncer at exit", exc_info=True)


class PgBouncer:
    """One PgBouncer process per fronted server of a started :class:`LocalCluster`.

    Each listens on its own free port of 127.0.0.1 and passes the cluster's
    user and password through to its server (SCRAM both ways); every database
    of the server is reachable by its own name. The admin console is the
    ``pgbouncer`` database of each, for the cluster's user (:meth:`admin`).

    Args:
        cluster: The cluster whose servers to front; started before :meth:`start`.
        nodes: The nodes (or their names) to front; default every node.
        binary: The ``pgbouncer`` binary; found with :func:`find_pgbouncer` if omitted.
        base_dir: A directory to create the temporary directory in (default: the
            system temporary directory).
        settings: ``pgbouncer.ini`` settings over :data:`DEFAULT_SETTINGS`, for
            instance ``{"pool_mode": "session"}`` or, with PgBouncer >= 1.21,
            ``{"max_prepared_statements": "100"}``.

    Raises:
        TypeError: ``cluster`` is not a ``LocalCluster``.
        ValueError: Another argument is invalid.
    """

    __slots__ = (
        "_base_parent",
        "_binary_arg",
        "_bouncers",
        "_node_args",
        "_owner_pid",
        "_run_as",
        "_watchdog",
        "base_dir",
        "binary",
        "cluster",
        "settings",
        "version",
    )

    def __init__(
        self,
        cluster: LocalCluster,
        nodes: Sequence[ClusterNode | str] | None = None,
        *,
        binary: str | Path | None = None,
        base_dir: str | Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(cluster, LocalCluster):
            msg = f"cluster must be a LocalCluster, got {type(cluster).__name__}"
            raise TypeError(msg)
        names = None if nodes is None else [n if isinstance(n, str) else n.name for n in nodes]
        if names is not None and (not names or len(set(names)) != len(names)):
            msg = f"nodes must be None or distinct nodes (at least one), got {names!r}"
            raise ValueError(msg)
        merged = {**DEFAULT_SETTINGS, **(settings or {})}
        for key, value in merged.items():
            if not _SETTING_NAME.match(key) or key in _FIXED:
                msg = f"settings: {key!r} is not a setting PgBouncer lets you choose here"
                raise ValueError(msg)
            if "\n" in value or "\r" in value:
                msg = f"settings: the value of {key!r} contains a line break"
                raise ValueError(msg)
        self.cluster = cluster
        self._node_args = names
        self._binary_arg = Path(binary) if binary is not None else None
        self._base_parent = Path(base_dir) if base_dir is not None else None
        self.settings = merged
        self.binary: Path | None = None
        self.version: str | None = None
        self.base_dir: Path | None = None
        self._run_as: RunAs | None = None
        self._bouncers: dict[str, _Bouncer] = {}
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        ports = ", ".join(f"{b.node}:{b.port}" for b in self._bouncers.values()) or "not started"
        return f"<PgBouncer {ports}>"

    # -- addresses ---------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """The names of the fronted nodes, in the cluster's order."""
        self._require_started()
        return list(self._bouncers)

    def port(self, node: ClusterNode | str) -> int:
        """The port on 127.0.0.1 where the node's PgBouncer listens."""
        return self._bouncer(node).port

    def dsn(self, node: ClusterNode | str) -> str:
        """The libpq/asyncpg URL (``postgresql://...``) of a node through its PgBouncer."""
        cluster = self.cluster
        credentials = f"{quote(cluster.user, safe='')}:{quote(cluster.password, safe='')}"
        database = quote(cluster.database, safe="")
        return f"postgresql://{credentials}@127.0.0.1:{self.port(node)}/{database}"

    def url(self, node: ClusterNode | str) -> str:
        """The SQLAlchemy URL of a node through its PgBouncer, for the cluster's driver."""
        return f"postgresql+{self.cluster.driver}" + self.dsn(node).removeprefix("postgresql")

    @property
    def primary_url(self) -> str:
        """SQLAlchemy URL of the cluster's primary through PgBouncer.

        Raises:
            KeyError: The primary is not fronted.
        """
        return self.url(self.cluster.primary)

    @property
    def replica_urls(self) -> list[str]:
        """SQLAlchemy URLs of the fronted replicas, in order."""
        self._require_started()
        return [self.url(n) for n in self.cluster.replicas if n.name in self._bouncers]

    def log_tail(self, node: ClusterNode | str, lines: int = 30) -> str:
        """The last ``lines`` lines of the node's PgBouncer log."""
        return "\n".join(self._bouncer(node).log_text().splitlines()[-lines:])

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

    def start(self) -> Self:
        """Start one PgBouncer per fronted node; a no-op when started.

        Returns:
            The bouncer itself.

        Raises:
            PgBouncerNotFoundError: No usable ``pgbouncer`` binary.
            ClusterError: The cluster is not started, or a PgBouncer did not start.
            KeyError: ``nodes`` names a node the cluster does not have.
        """
        if self._bouncers:
            return self
        self._owner_pid = os.getpid()
        self._run_as = run_as = server_user()
        self.binary = find_pgbouncer(self._binary_arg)
        self.version = version(self.binary, run_as)
        cluster = self.cluster
        if self._node_args is None:
            targets = cluster.nodes
        else:
            targets = [cluster.node(name) for name in self._node_args]
        parent = self._base_parent or Path(tempfile.gettempdir())
        base = Path(tempfile.mkdtemp(prefix="replica-router-pgbouncer-", dir=parent))
        self.base_dir = base
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            base.chmod(0o755)  # lets the server user reach its directories
            self._start_watchdog(base)
            for target in targets:
                directory = base / target.name
                directory.mkdir(mode=0o700)
                self._chown(directory)
                bouncer = _Bouncer(target.name, free_port(), directory)
                self._bouncers[target.name] = bouncer
                self._write_files(bouncer, target)
                self._spawn(bouncer, target)
        except BaseException:
            self.stop()
            raise
        logger.debug("PgBouncer %s started for %s", self.version, ", ".join(self._bouncers))
        return self

    def stop(self) -> None:
        """Stop every PgBouncer (SIGKILL after a grace period) and remove the directory."""
        try:
            self._stop_processes()
        finally:
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                # End of file makes the watchdog sweep what is left and remove the directory.
                if watchdog.stdin is not None:
                    watchdog.stdin.close()
                try:
                    watchdog.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    watchdog.kill()
                    watchdog.wait()
            if self.base_dir is not None:
                _watchdog.sweep(str(self.base_dir))
                shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
            self._bouncers = {}
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def is_running(self, node: ClusterNode | str) -> bool:
        """Whether the node's PgBouncer process is running."""
        process = self._bouncer(node).process
        return process is not None and process.poll() is None

    # -- admin console -----------------------------------------------------------------------

    def admin(
        self, sql: str, *, node: ClusterNode | str | None = None, timeout: float = 30.0
    ) -> list[tuple[str, ...]]:
        """Run a PgBouncer admin console command (``SHOW POOLS``, ``SHOW CLIENTS``, ...).

        It runs with the cluster's ``psql`` against the ``pgbouncer`` database.

        Args:
            sql: The console command.
            node: Whose PgBouncer; may be omitted when only one node is fronted.
            timeout: Seconds before giving up.

        Returns:
            The rows, as tuples of text (``NULL`` as ``""``).

        Raises:
            ValueError: ``node`` is omitted and several nodes are fronted.
            ClusterError: psql failed or timed out.
        """
        self._require_started()
        if node is None:
            if len(self._bouncers) != 1:
                msg = f"name the node whose PgBouncer to ask: one of {list(self._bouncers)}"
                raise ValueError(msg)
            node = next(iter(self._bouncers))
        bouncer = self._bouncer(node)
        run_as = self._run_as
        assert run_as is not None
        assert self.base_dir is not None
        uid, gid, groups = ids(run_as)
        psql = str(self.cluster.bin_dir / "psql")
        args = psql_args(self.cluster.user, "pgbouncer", sql)
        try:
            result = subprocess.run(
                [psql, "-h", "127.0.0.1", "-p", str(bouncer.port), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.base_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                check=False,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        except subprocess.TimeoutExpired as exc:
            msg = f"PgBouncer admin command on {bouncer.node} timed out after {timeout}s"
            raise ClusterError(msg) from exc
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            msg = f"PgBouncer admin command on {bouncer.node} failed: {detail}"
            raise ClusterError(msg)
        return parse_rows(result.stdout)

    # -- internals ---------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._bouncers:
            msg = "PgBouncer is not started; call start() or use it as a context manager"
            raise ClusterError(msg)

    def _bouncer(self, node: ClusterNode | str) -> _Bouncer:
        self._require_started()
        name = node if isinstance(node, str) else node.name
        try:
            return self._bouncers[name]
        except KeyError:
            msg = f"{name!r} is not fronted by PgBouncer; fronted nodes are {list(self._bouncers)}"
            raise KeyError(msg) from None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", PGPASSWORD=self.cluster.password)
        if self.base_dir is not None:
            env["HOME"] = str(self.base_dir)
        return env

    def _chown(self, path: Path) -> None:
        if self._run_as is not None and self._run_as.switch:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _write_files(self, bouncer: _Bouncer, target: ClusterNode) -> None:
        cluster = self.cluster
        userlist = bouncer.directory / "userlist.txt"
        # The password is in there: readable by the server user only.
        fd = os.open(userlist, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{_ini_quote(cluster.user)} {_ini_quote(cluster.password)}\n")
        self._chown(userlist)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(bouncer.port),
            "unix_socket_dir": "",  # TCP only: no socket files in /tmp
            "auth_file": str(userlist),
            "admin_users": cluster.user,
            **self.settings,
        }
        lines = [
            f"; replica_router.testing: PgBouncer for {target.name}\n",
            "[databases]\n",
            # Every database of the server, by its own name.
            f"* = host=127.0.0.1 port={target.port}\n",
            "\n[pgbouncer]\n",
        ]
        lines += [f"{key} = {value}\n" for key, value in settings.items()]
        bouncer.config.write_text("".join(lines))
        self._chown(bouncer.config)

    def _spawn(self, bouncer: _Bouncer, target: ClusterNode) -> None:
        assert self.binary is not None
        assert self._run_as is not None
        uid, gid, groups = ids(self._run_as)
        for attempt in range(3):
            with open(bouncer.log_file, "ab") as log:
                self._chown(bouncer.log_file)
                bouncer.log_offset = log.tell()
                # Working in its directory, with the config path in its command line:
                # the watchdog (and any ps) finds it under the base directory.
                bouncer.process = subprocess.Popen(
                    [str(self.binary), str(bouncer.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=bouncer.directory,
                    env=self._env(),
                    start_new_session=True,
                    user=uid,
                    group=gid,
                    extra_groups=groups,
                )
            try:
                self._wait_ready(bouncer)
            except ClusterError:
                # The port was free when picked; another process may have taken it since.
                log_text = bouncer.log_text(bouncer.log_offset)
                if attempt == 2 or "Address already in use" not in log_text:
                    raise
                bouncer.port = free_port()
                self._write_files(bouncer, target)
                continue
            return

    def _wait_ready(self, bouncer: _Bouncer) -> None:
        process = bouncer.process
        assert process is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            text = bouncer.log_text(bouncer.log_offset)
            if process.poll() is not None:
                bouncer.process = None
                msg = (
                    f"PgBouncer for {bouncer.node} exited with status {process.returncode} "
                    f"while starting; log:\n{text.strip()}"
                )
                raise ClusterError(msg)
            # Logged once it listens, after the configuration was accepted.
            if "process up:" in text:
                return
            if time.monotonic() > deadline:
                msg = f"PgBouncer for {bouncer.node} not up after {_READY_TIMEOUT}s; log:\n{text}"
                raise ClusterError(msg)
            time.sleep(0.01)

    def _stop_processes(self) -> None:
        # Immediate shutdown is SIGTERM up to 1.22; from 1.23 SIGTERM waits for every
        # client to leave and SIGQUIT is the immediate one.
        major, minor = (int(part) for part in (self.version or "0.0").split(".")[:2])
        immediate = signal.SIGQUIT if (major, minor) >= (1, 23) else signal.SIGTERM
        running = [b for b in self._bouncers.values() if b.process is not None]
        for bouncer in running:
            assert bouncer.process is not None
            if bouncer.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    bouncer.process.send_signal(immediate)
        deadline = time.monotonic() + _STOP_GRACE
        for bouncer in running:
            assert bouncer.process is not None
            try:
                bouncer.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("PgBouncer for %s ignored %s; killing it", bouncer.node, immediate)
                bouncer.process.kill()
                bouncer.process.wait()
            bouncer.process = None

    def _start_watchdog(self, base: Path) -> None:
        self._watchdog = start_watchdog(base)
