"""A throwaway PostgreSQL primary with streaming replicas, with fault controls.

``LocalCluster`` runs real servers from local binaries (see
:func:`~replica_router.testing.find_pg_bin`) on free loopback ports, in a
temporary directory that is removed on :meth:`LocalCluster.stop`. Replicas are
made with ``pg_basebackup -R`` and each holds a replication slot, so a stopped
or paused replica can always catch up. Started as root, every server and
client tool runs as an unprivileged user (``postgres`` by default, see
``REPLICA_ROUTER_PG_USER``).

No server outlives its owner: ``stop()`` runs from the context manager, from
``atexit``, and failing both, a small watchdog process SIGKILLs the servers when
the owning process dies (SIGKILL included) and removes the directory.

With ``replica_addresses`` the replicas listen on loopback addresses of their own
(``127.0.0.2``, ``127.0.0.3``, ...) and all on one port: a DNS name over those
addresses (a hosts-file entry) stands for a Kubernetes headless Service.

Example::

    from replica_router.testing import LocalCluster

    with LocalCluster(replicas=2) as cluster:
        cluster.execute("primary", "CREATE TABLE t (id int)")
        cluster.wait_for_replay()
        cluster.pause_replay("replica-1")  # replica-1 now lags
        engine = create_async_engine(cluster.primary_url)
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from replica_router.testing import _watchdog
from replica_router.testing._base import (
    BASE_SETTINGS,
    STOP_SIGNALS,
    ClusterBase,
    ClusterError,
    Driver,
    Role,
    StopMode,
    check_addresses,
    check_arguments,
    conf_value,
    free_port,
    free_shared_port,
    sql_ident,
    start_watchdog,
    stop_steps,
)
from replica_router.testing._binaries import RunAs, ensure_reachable, find_pg_bin, server_user

__all__ = ["ClusterError", "ClusterNode", "LocalCluster"]

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class ClusterNode:
    """One server of a :class:`LocalCluster`.

    Attributes:
        name: ``primary``, ``replica-1``, ``replica-2``, ...
        role: ``"primary"`` or ``"replica"``; a promoted replica becomes ``"primary"``.
        port: The TCP port on ``host``, fixed for the cluster's lifetime.
        data_dir: The server's data directory.
        log_file: Where the server's output goes.
        pid: The postmaster's process id while it runs, else ``None``.
        host: The address it listens on (127.0.0.1 unless ``replica_addresses``).
        socket_dir: Its own Unix socket directory (None: the cluster's shared one).
    """

    name: str
    role: Role
    port: int
    data_dir: Path
    log_file: Path
    pid: int | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    socket_dir: Path | None = None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the server log."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LocalCluster(ClusterBase[ClusterNode]):
    """A primary and ``replicas`` streaming replicas on free loopback ports.

    Args:
        replicas: How many streaming replicas to start (0 or more).
        bin_dir: A PostgreSQL ``bin`` directory; found with ``find_pg_bin()`` if omitted.
        base_dir: A directory to create the cluster's temporary directory in
            (default: the system temporary directory). Only the created
            directory is removed on ``stop()``.
        user: The database role in the URLs: a superuser with ``REPLICATION``
            and a password (default ``postgres``).
        password: Its password (default: a random token).
        database: The database in the URLs, created at start (default ``app``).
        server_settings: Extra ``postgresql.conf`` settings for every node.
        replica_addresses: One IPv4 loopback address per replica (all of 127/8 is
            loopback on Linux) for it to listen on instead of 127.0.0.1, every replica
            on the same port (free on each), each with a socket directory of its own.

    Raises:
        ValueError: An argument is invalid.
    """

    __slots__ = (
        "_base_parent",
        "_bin_arg",
        "_bin_dir",
        "_frozen",
        "_nodes",
        "_owner_pid",
        "_run_as",
        "_watchdog",
        "base_dir",
        "database",
        "driver",
        "password",
        "replica_addresses",
        "replica_count",
        "server_settings",
        "user",
    )

    def __init__(
        self,
        replicas: int = 2,
        *,
        bin_dir: str | Path | None = None,
        base_dir: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        database: str = "app",
        server_settings: Mapping[str, str] | None = None,
        replica_addresses: Sequence[str] | None = None,
    ) -> None:
        settings = check_arguments(
            replicas,
            user=user,
            password=password,
            database=database,
            server_settings=server_settings,
        )
        self.replica_count = replicas
        self.replica_addresses = check_addresses(replica_addresses, replicas)
        self._bin_arg = Path(bin_dir) if bin_dir is not None else None
        self._base_parent = Path(base_dir) if base_dir is not None else None
        self.user = user or "postgres"
        self.password = password or secrets.token_urlsafe(18)
        self.database = database
        self.driver: Driver = "asyncpg"
        self.server_settings = settings
        self._bin_dir: Path | None = None
        self._run_as: RunAs | None = None
        self._nodes: list[ClusterNode] = []
        self._frozen: set[str] = set()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self.base_dir: Path | None = None

    def __repr__(self) -> str:
        ports = ", ".join(f"{node.name}:{node.port}" for node in self._nodes) or "not started"
        return f"<LocalCluster {ports}>"

    # -- nodes and URLs ----------------------------------------------------------------------

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node, the primary first."""
        self._require_started()
        return list(self._nodes)

    @property
    def bin_dir(self) -> Path:
        """The PostgreSQL ``bin`` directory in use."""
        self._require_started()
        assert self._bin_dir is not None
        return self._bin_dir

    def _host(self, node: ClusterNode) -> str:
        return node.host

    def _sockets(self, node: ClusterNode) -> Path:
        assert self.base_dir is not None
        return node.socket_dir or self.base_dir / "sockets"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Create and start the primary and the replicas; a no-op when started.

        Returns:
            The cluster itself.

        Raises:
            PostgresNotFoundError: No usable binaries.
            ClusterError: A server did not start.
        """
        if self._nodes:
            return self
        started = time.monotonic()
        self._owner_pid = os.getpid()
        self._run_as = run_as = server_user()
        if self._bin_arg is None:
            self._bin_dir = find_pg_bin(run_as.name)
        else:
            self._bin_dir = ensure_reachable(self._bin_arg, run_as)
        parent = self._base_parent or Path(tempfile.gettempdir())
        self.base_dir = base = Path(tempfile.mkdtemp(prefix="replica-router-", dir=parent))
        self._register()
        try:
            base.chmod(0o755)  # lets the server user reach its directories
            self._watchdog = start_watchdog(base)
            (base / "sockets").mkdir()
            self._chown(base / "sockets")
            self._create_primary()
            addresses = self.replica_addresses
            port = free_shared_port(addresses) if addresses else None
            with ThreadPoolExecutor(max_workers=max(1, min(self.replica_count, 4))) as pool:
                indexes = range(1, self.replica_count + 1)
                replicas = list(pool.map(lambda i: self._create_replica(i, port), indexes))
            self._nodes.extend(replicas)
            for replica in replicas:
                self._spawn(replica)
            for replica in replicas:
                self._wait_ready(replica)
        except BaseException:
            self.stop()
            raise
        logger.debug(
            "local cluster with %d replicas started in %.2fs",
            self.replica_count,
            time.monotonic() - started,
        )
        return self

    def stop(self) -> None:
        """Stop every server (fast, then immediate, then SIGKILL) and remove the directory."""
        try:
            for name in list(self._frozen):
                self.thaw_node(name)
            self._stop_nodes(self._nodes, "fast")
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
            self._nodes = []
            self._unregister()

    # -- fault controls ----------------------------------------------------------------------

    def is_running(self, node: ClusterNode | str) -> bool:
        """Whether the node's postmaster is running."""
        target = self.node(node)
        process = target._process
        return not (process is None or process.poll() is not None)

    def stop_node(self, node: ClusterNode | str, mode: StopMode = "fast") -> None:
        """Shut a node down (``smart``, ``fast`` or ``immediate``), escalating if it hangs."""
        stop_steps(mode)  # checks the mode before anything is stopped
        self._stop_nodes([self.node(node)], mode)

    def kill_node(self, node: ClusterNode | str) -> None:
        """SIGKILL a node's postmaster and all its children, as a crash would.

        ``start_node()`` works afterwards: the stale ``postmaster.pid`` and socket
        lock files are removed once no process of the node is left.
        """
        target = self.node(node)
        self._frozen.discard(target.name)
        process = target._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        _watchdog.sweep(str(target.data_dir.resolve()), exact=True)
        if process is not None:
            process.wait()
        self._forget(target)

    def freeze_node(self, node: ClusterNode | str) -> None:
        """SIGSTOP every process of a node: a hung server (or machine) that keeps its
        connections open and answers nothing. :meth:`thaw_node` resumes it."""
        target = self.node(node)
        if target.pid is None:
            msg = f"{target.name} is not running"
            raise ClusterError(msg)
        os.kill(target.pid, signal.SIGSTOP)  # first: it forks no backend from now on
        self._frozen.add(target.name)
        for pid in _watchdog.processes_under(str(target.data_dir.resolve()), exact=True):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw_node(self, node: ClusterNode | str) -> None:
        """SIGCONT every process of a node frozen by :meth:`freeze_node`."""
        target = self.node(node)
        self._frozen.discard(target.name)
        pids = _watchdog.processes_under(str(target.data_dir.resolve()), exact=True)
        for pid in [*pids, *([target.pid] if target.pid else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def is_frozen(self, node: ClusterNode | str) -> bool:
        """Whether :meth:`freeze_node` stopped the node and it was not thawed since."""
        return self.node(node).name in self._frozen

    def _promote(self, node: ClusterNode, timeout: float) -> None:
        self._tool("pg_ctl", "promote", "-D", str(node.data_dir), "-w", "-t", str(int(timeout)))

    def _log_tail(self, node: ClusterNode) -> str:
        return node.log_tail()

    def _psql(self, node: ClusterNode, args: list[str], timeout: float) -> str:
        assert self.base_dir is not None
        result = self._tool(
            "psql",
            "-h",
            str(self._sockets(node)),
            "-p",
            str(node.port),
            *args,
            timeout=timeout,
            what=f"SQL on {node.name}",
        )
        return result.stdout

    # -- internals ---------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._nodes:
            msg = "the cluster is not started; call start() or use it as a context manager"
            raise ClusterError(msg)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", PGPASSWORD=self.password)
        if self.base_dir is not None:
            env["HOME"] = str(self.base_dir)
        return env

    def _ids(self) -> tuple[int | None, int | None, list[int] | None]:
        """``user``, ``group`` and ``extra_groups`` for subprocesses: switch when root."""
        run_as = self._run_as
        if run_as is None or not run_as.switch:
            return None, None, None
        return run_as.uid, run_as.gid, list(run_as.groups)

    def _chown(self, path: Path) -> None:
        if self._run_as is not None and self._run_as.switch:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _tool(
        self, name: str, *args: str, timeout: float = 120.0, what: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        assert self._bin_dir is not None
        assert self.base_dir is not None
        uid, gid, groups = self._ids()
        try:
            result = subprocess.run(
                [str(self._bin_dir / name), *args],
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
            msg = f"{what or name} timed out after {timeout}s"
            raise ClusterError(msg) from exc
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            msg = f"{what or name} failed (exit {result.returncode}): {detail}"
            raise ClusterError(msg)
        return result

    def _node_dirs(self, name: str) -> tuple[Path, Path]:
        assert self.base_dir is not None
        node_dir = self.base_dir / name
        node_dir.mkdir(mode=0o700)
        self._chown(node_dir)
        data_dir = node_dir / "data"
        data_dir.mkdir(mode=0o700)
        self._chown(data_dir)
        return data_dir, node_dir / "server.log"

    def _write_settings(self, node: ClusterNode) -> None:
        assert self.base_dir is not None
        settings = {"listen_addresses": node.host, **BASE_SETTINGS}
        settings["port"] = str(node.port)
        settings["unix_socket_directories"] = str(self._sockets(node))
        settings["max_wal_senders"] = str(max(10, self.replica_count + 4))
        settings["max_replication_slots"] = str(max(10, self.replica_count + 4))
        settings.update(self.server_settings)
        lines = [f"\n# replica_router.testing: {node.name}\n"]
        lines += [f"{key} = {conf_value(value)}\n" for key, value in settings.items()]
        with open(node.data_dir / "postgresql.conf", "a") as conf:
            conf.writelines(lines)

    def _create_primary(self) -> None:
        assert self.base_dir is not None
        data_dir, log_file = self._node_dirs("primary")
        node = ClusterNode("primary", "primary", free_port(), data_dir, log_file)
        self._nodes.append(node)
        pwfile = self.base_dir / "primary" / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        try:
            self._tool(
                "initdb",
                "-D",
                str(data_dir),
                "-N",
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            )
        finally:
            pwfile.unlink()
        self._write_settings(node)
        self._spawn(node, retry_ports=True)
        self._wait_ready(node)
        if self.database != "postgres":
            self.execute(node, f"CREATE DATABASE {sql_ident(self.database)}", database="postgres")
        # Slots reserve WAL from now on: concurrent base backups' checkpoints cannot
        # remove what a replica still needs (pg_basebackup -C would reserve it too late).
        slots = ", ".join(
            f"pg_create_physical_replication_slot('replica_{i}', true)"
            for i in range(1, self.replica_count + 1)
        )
        if slots:
            self.execute(node, f"SELECT {slots}")

    def _create_replica(self, index: int, port: int | None = None) -> ClusterNode:
        name = f"replica-{index}"
        data_dir, log_file = self._node_dirs(name)
        primary = self._nodes[0]
        node = ClusterNode(name, "replica", port or free_port(), data_dir, log_file)
        if self.replica_addresses:  # one port for all: one socket directory each
            node.host, node.socket_dir = self.replica_addresses[index - 1], data_dir.parent
        conninfo = f"host=127.0.0.1 port={primary.port} user={self.user} application_name={name}"
        self._tool(
            "pg_basebackup",
            "-D",
            str(data_dir),
            "-d",
            conninfo,
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            "-N",
            "-S",
            f"replica_{index}",
            what=f"pg_basebackup for {name}",
        )
        self._write_settings(node)
        return node

    def _spawn(self, node: ClusterNode, *, retry_ports: bool = False) -> None:
        assert self._bin_dir is not None
        uid, gid, groups = self._ids()
        for attempt in range(3 if retry_ports else 1):
            with open(node.log_file, "ab") as log:
                self._chown(node.log_file)
                process: subprocess.Popen[bytes] = subprocess.Popen(
                    [str(self._bin_dir / "postgres"), "-D", str(node.data_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=node.data_dir.parent,
                    env=self._env(),
                    start_new_session=True,
                    user=uid,
                    group=gid,
                    extra_groups=groups,
                )
            node._process = process
            node.pid = process.pid
            if not retry_ports:
                return
            # The port was free when picked; another process may have taken it since.
            try:
                self._wait_ready(node)
            except ClusterError:
                if attempt == 2 or "could not bind" not in node.log_tail():
                    raise
                node.port = free_port()
                self._write_settings(node)
                continue
            return

    def _wait_ready(self, node: ClusterNode, timeout: float = 60.0) -> None:
        process = node._process
        assert process is not None
        pid_file = node.data_dir / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                self._forget(node)
                msg = (
                    f"{node.name} exited with status {process.returncode} while starting; "
                    f"log tail:\n{node.log_tail()}"
                )
                raise ClusterError(msg)
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                lines = []
            # Line 8 of postmaster.pid is the status that pg_ctl waits for.
            if (
                len(lines) >= 8
                and lines[0] == str(process.pid)
                and lines[7].strip() in ("ready", "standby")
            ):
                return
            if time.monotonic() > deadline:
                msg = f"{node.name} not ready after {timeout}s; log tail:\n{node.log_tail()}"
                raise ClusterError(msg)
            time.sleep(0.01)

    def _forget(self, node: ClusterNode) -> None:
        """Clean up after a postmaster that is gone: no process, no stale lock files."""
        assert self.base_dir is not None
        _watchdog.sweep(str(node.data_dir.resolve()), exact=True)
        for stale in (
            node.data_dir / "postmaster.pid",
            self._sockets(node) / f".s.PGSQL.{node.port}.lock",
        ):
            stale.unlink(missing_ok=True)
        node._process = None
        node.pid = None

    def _stop_nodes(self, nodes: Sequence[ClusterNode], mode: str) -> None:
        steps = stop_steps(mode)
        pending = [n for n in nodes if n._process is not None]
        for step, grace in steps:
            for node in pending:
                assert node._process is not None
                if node._process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        node._process.send_signal(STOP_SIGNALS[step])
            deadline = time.monotonic() + grace
            for node in pending:
                assert node._process is not None
                try:
                    node._process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("%s ignored a %s shutdown; escalating", node.name, step)
            pending = [n for n in pending if n._process is not None and n._process.poll() is None]
            if not pending:
                break
        for node in nodes:
            if node._process is not None:
                if node._process.poll() is None:
                    node._process.kill()
                    node._process.wait()
                self._forget(node)
