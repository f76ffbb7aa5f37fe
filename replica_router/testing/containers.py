"""A primary with streaming replicas in Docker containers, with the fault controls of
:class:`~replica_router.testing.LocalCluster`.

``DockerCluster`` has the interface of ``LocalCluster`` (``start``/``stop``, context
manager, ``nodes``, ``url``/``dsn``, ``execute``, ``stop_node``, ``kill_node``,
``start_node``, ``restart_node``, ``pause_replay``, ``resume_replay``, ``promote``,
``wait_for_replay``), but each server is a container of the official ``postgres``
image on a Docker network of its own:

* the primary is configured for replication (``wal_level=replica``, a
  ``REPLICATION`` role, a ``pg_hba.conf`` entry for it, a slot per replica) by an
  init script that the image's entrypoint runs once;
* each replica is a container of the same image that makes itself with
  ``pg_basebackup -R`` from the primary, then runs as a hot standby;
* ``kill_node`` kills the container (SIGKILL to the postmaster, which is its PID 1),
  ``stop_node`` sends the postmaster the shutdown mode's signal, ``promote`` runs
  ``pg_promote()``, and replay is paused with ``pg_wal_replay_pause()``.

Each server's port 5432 is published on a host port picked at start, which stays the
same across ``stop_node``/``start_node``. The containers and the network are removed
by ``stop()``, at interpreter exit, and, if the owning process dies, by
testcontainers' reaper (Ryuk) unless ``TESTCONTAINERS_RYUK_DISABLED`` is set.

It needs the ``testcontainers`` extra (``pip install 'replica-router[testcontainers]'``)
and a reachable Docker engine (``DOCKER_HOST`` or the local socket).

Example::

    from replica_router.testing.containers import DockerCluster

    with DockerCluster(replicas=2) as cluster:
        cluster.pause_replay("replica-1")  # replica-1 now lags
        router = ReplicaRouter(cluster.primary_url, replica_urls=cluster.replica_urls)
"""

from __future__ import annotations

import gc
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from replica_router.testing._base import (
    BASE_SETTINGS,
    STOP_SIGNALS,
    ClusterBase,
    ClusterError,
    Driver,
    Role,
    StopMode,
    check_arguments,
    free_port,
    stop_steps,
)

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

__all__ = [
    "DEFAULT_IMAGE",
    "ContainerSpec",
    "DockerCluster",
    "DockerNode",
    "docker_engine_error",
]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "postgres:18"
REPLICATION_USER = "replicator"
MISSING_EXTRA = (
    "DockerCluster needs the testcontainers extra: "
    "pip install 'replica-router[testcontainers]' (missing: {missing})"
)

_PORT = 5432
_REPLICA_DATA = "/var/lib/postgresql/replica-router"
_INIT_SCRIPT = "/docker-entrypoint-initdb.d/replica-router.sh"
_READY_TIMEOUT = 120.0
_DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# Sourced once by the image's entrypoint, on the temporary server that initdb starts.
_PRIMARY_INIT = """\
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \\
    -v role="$REPLICA_ROUTER_REPLICATION_USER" \\
    -v password="$REPLICA_ROUTER_REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"role" WITH LOGIN REPLICATION PASSWORD :'password';
{slots}
SQL
echo "host replication $REPLICA_ROUTER_REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
"""

# The primary's entrypoint: install the init script, then the image's own entrypoint.
_PRIMARY_ENTRYPOINT = """\
set -eu
cat > {init} <<'INIT'
{script}INIT
exec docker-entrypoint.sh "$@"
"""

# A replica's entrypoint (as the postgres user): a base backup on first start, then the server.
_REPLICA_ENTRYPOINT = """\
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    pg_basebackup --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream \\
        --checkpoint=fast --no-sync --slot="$REPLICA_ROUTER_SLOT" \\
        --dbname="host=$REPLICA_ROUTER_PRIMARY_HOST port={port} \\
user=$REPLICA_ROUTER_REPLICATION_USER password=$REPLICA_ROUTER_REPLICATION_PASSWORD \\
application_name=$REPLICA_ROUTER_NODE"
fi
exec "$@"
"""


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What :meth:`DockerCluster.start` runs for one node (host port aside).

    Attributes:
        node: The node's name, also its host name on the cluster's network.
        image: The Docker image.
        entrypoint: Replaces the image's entrypoint.
        command: The server's command line (``postgres -c ...``).
        environment: The container's environment; it holds passwords.
        user: The user the entrypoint runs as (``None``: the image's, root).
    """

    node: str
    image: str
    entrypoint: tuple[str, ...]
    command: tuple[str, ...]
    environment: Mapping[str, str] = field(repr=False)
    user: str | None = None


@dataclass(eq=False, slots=True)
class DockerNode:
    """One server of a :class:`DockerCluster`.

    Attributes:
        name: ``primary``, ``replica-1``, ``replica-2``, ...
        role: ``"primary"`` or ``"replica"``; a promoted replica becomes ``"primary"``.
        port: The host port that the container's 5432 is published on.
        host: The host to connect to (the Docker host, as testcontainers finds it).
        container_name: The container's name.
    """

    name: str
    role: Role
    port: int
    container_name: str
    host: str = "localhost"
    _container: DockerContainer | None = field(default=None, repr=False)


def server_command(settings: Mapping[str, str]) -> tuple[str, ...]:
    """``postgres -c name=value ...`` for every setting."""
    command = ["postgres"]
    for key, value in settings.items():
        command += ["-c", f"{key}={value}"]
    return tuple(command)


def primary_init_script(replicas: int) -> str:
    """The init script that makes the primary ready for ``replicas`` streaming replicas."""
    slots = "\n".join(
        f"SELECT pg_create_physical_replication_slot('replica_{i}', true);"
        for i in range(1, replicas + 1)
    )
    return _PRIMARY_INIT.format(slots=slots)


def _require_extra() -> None:
    try:
        import docker  # noqa: F401
        import testcontainers.core.container  # noqa: F401
    except ImportError as exc:
        raise ImportError(MISSING_EXTRA.format(missing=exc.name or exc), name=exc.name) from exc


def docker_engine_error() -> str | None:
    """Why no Docker engine answers a ping (``DOCKER_HOST`` or the local socket), or ``None``.

    Raises:
        ImportError: The ``testcontainers`` extra is not installed.
    """
    _require_extra()
    import docker

    where = os.environ.get("DOCKER_HOST") or _DEFAULT_DOCKER_HOST
    if where.startswith("unix://") and not os.path.exists(where.removeprefix("unix://")):
        return f"no Docker engine reachable at {where}: no such socket"
    try:
        client = docker.from_env()
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        reason = f"no Docker engine reachable at {where}: {exc}"
    else:
        return None
    # docker leaves the socket of a failed connection to the garbage collector, which
    # would warn about it at some later point: collect it now, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return reason


class DockerCluster(ClusterBase[DockerNode]):
    """A primary and ``replicas`` streaming replicas in Docker containers.

    Args:
        replicas: How many streaming replicas to start (0 or more).
        image: The PostgreSQL image (the official ``postgres`` image or one built on it).
        user: The database role in the URLs, a superuser (default ``postgres``).
        password: Its password (default: a random token).
        database: The database in the URLs, created at start (default ``app``).
        server_settings: Extra server settings for every node.

    Raises:
        ValueError: An argument is invalid.
    """

    __slots__ = (
        "_network",
        "_nodes",
        "_owner_pid",
        "_prefix",
        "_replication_password",
        "database",
        "driver",
        "image",
        "password",
        "replica_count",
        "server_settings",
        "user",
    )

    def __init__(
        self,
        replicas: int = 2,
        *,
        image: str = DEFAULT_IMAGE,
        user: str | None = None,
        password: str | None = None,
        database: str = "app",
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.server_settings = check_arguments(
            replicas,
            user=user,
            password=password,
            database=database,
            server_settings=server_settings,
        )
        if not image:
            msg = "image must be a non-empty string"
            raise ValueError(msg)
        self.replica_count = replicas
        self.image = image
        self.user = user or "postgres"
        self.password = password or secrets.token_urlsafe(18)
        self.database = database
        self.driver: Driver = "asyncpg"
        self._replication_password = secrets.token_urlsafe(18)
        self._prefix = f"replica-router-{secrets.token_hex(4)}"
        self._nodes: list[DockerNode] = []
        self._network: Network | None = None
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        ports = ", ".join(f"{node.name}:{node.port}" for node in self._nodes) or "not started"
        return f"<DockerCluster {ports}>"

    @property
    def nodes(self) -> list[DockerNode]:
        """Every node, the primary first."""
        if not self._nodes:
            msg = "the cluster is not started; call start() or use it as a context manager"
            raise ClusterError(msg)
        return list(self._nodes)

    def _host(self, node: DockerNode) -> str:
        return node.host

    # -- what runs ---------------------------------------------------------------------------

    def settings(self) -> dict[str, str]:
        """The server settings of every node."""
        slots = str(max(10, self.replica_count + 4))
        return {
            **BASE_SETTINGS,
            "listen_addresses": "*",
            "max_wal_senders": slots,
            "max_replication_slots": slots,
            **self.server_settings,
        }

    def container_specs(self) -> list[ContainerSpec]:
        """What :meth:`start` runs: the primary's container, then each replica's."""
        command = server_command(self.settings())
        replication = {
            "REPLICA_ROUTER_REPLICATION_USER": REPLICATION_USER,
            "REPLICA_ROUTER_REPLICATION_PASSWORD": self._replication_password,
        }
        entrypoint = _PRIMARY_ENTRYPOINT.format(
            init=_INIT_SCRIPT, script=primary_init_script(self.replica_count)
        )
        specs = [
            ContainerSpec(
                node="primary",
                image=self.image,
                entrypoint=("bash", "-c", entrypoint, "bash"),
                command=command,
                environment={
                    "POSTGRES_USER": self.user,
                    "POSTGRES_PASSWORD": self.password,
                    "POSTGRES_DB": self.database,
                    **replication,
                },
            )
        ]
        for index in range(1, self.replica_count + 1):
            specs.append(
                ContainerSpec(
                    node=f"replica-{index}",
                    image=self.image,
                    entrypoint=("bash", "-c", _REPLICA_ENTRYPOINT.format(port=_PORT), "bash"),
                    command=command,
                    environment={
                        "PGDATA": _REPLICA_DATA,
                        "REPLICA_ROUTER_PRIMARY_HOST": "primary",
                        "REPLICA_ROUTER_SLOT": f"replica_{index}",
                        "REPLICA_ROUTER_NODE": f"replica-{index}",
                        **replication,
                    },
                    user="postgres",
                )
            )
        return specs

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DockerCluster:
        """Create the network and start the primary and the replicas; a no-op when started.

        Returns:
            The cluster itself.

        Raises:
            ImportError: The ``testcontainers`` extra is not installed.
            ClusterError: No Docker engine is reachable, or a server did not start.
        """
        if self._nodes:
            return self
        reason = docker_engine_error()
        if reason is not None:
            raise ClusterError(reason)
        from testcontainers.core.network import Network

        self._owner_pid = os.getpid()
        self._register()
        try:
            self._network = Network().create()
            primary, *replicas = self.container_specs()
            self._run(primary)
            self._wait_ready(self._nodes[0])
            for spec in replicas:
                self._run(spec)
            for node in self._nodes[1:]:
                self._wait_ready(node)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove every container and the network."""
        nodes, self._nodes = self._nodes, []
        for node in reversed(nodes):
            if node._container is not None:
                try:
                    node._container.stop()  # removes it, running or not
                except Exception:
                    logger.warning("could not remove the container of %s", node.name, exc_info=True)
        network, self._network = self._network, None
        if network is not None:
            try:
                network.remove()
            except Exception:
                logger.warning("could not remove the cluster's network", exc_info=True)
        self._unregister()

    # -- fault controls ----------------------------------------------------------------------

    def is_running(self, node: DockerNode | str) -> bool:
        """Whether the node's container (whose PID 1 is the postmaster) is running."""
        container = self.node(node)._container
        if container is None:
            return False
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def stop_node(self, node: DockerNode | str, mode: StopMode = "fast") -> None:
        """Shut a node down (``smart``, ``fast`` or ``immediate``), escalating if it hangs."""
        steps = stop_steps(mode)
        target = self.node(node)
        for step, grace in steps:
            if not self.is_running(target):
                return
            wrapped = self._wrapped(target)
            try:
                wrapped.kill(signal=STOP_SIGNALS[step].name)
                wrapped.wait(timeout=math.ceil(grace))
            except Exception:
                if self.is_running(target):
                    logger.warning("%s ignored a %s shutdown; escalating", target.name, step)
        self.kill_node(target)

    def kill_node(self, node: DockerNode | str) -> None:
        """Kill a node's container (SIGKILL to its postmaster), as a crash would."""
        target = self.node(node)
        if self.is_running(target):
            wrapped = self._wrapped(target)
            wrapped.kill()
            wrapped.wait(timeout=60)

    def _spawn(self, node: DockerNode) -> None:
        self._wrapped(node).start()

    def _promote(self, node: DockerNode, timeout: float) -> None:
        seconds = max(1, math.ceil(timeout))
        self.execute(node, f"SELECT pg_promote(true, {seconds})", timeout=timeout + 5)

    def _log_tail(self, node: DockerNode) -> str:
        return self.logs(node)

    def _psql(self, node: DockerNode, args: list[str], timeout: float) -> str:
        code, out, err = self._exec(node, ["psql", "-p", str(_PORT), *args], timeout)
        if code == 124:
            msg = f"SQL on {node.name} timed out after {timeout}s"
            raise ClusterError(msg)
        if code != 0:
            msg = f"SQL on {node.name} failed (exit {code}): {(err or out).strip()}"
            raise ClusterError(msg)
        return out

    def logs(self, node: DockerNode | str, lines: int = 30) -> str:
        """The last ``lines`` lines of a node's container output (its server log)."""
        container = self.node(node)._container
        if container is None:
            return ""
        try:
            raw = container.get_wrapped_container().logs(tail=lines)
        except Exception:
            return ""
        return bytes(raw).decode(errors="replace")

    # -- internals ---------------------------------------------------------------------------

    def _wrapped(self, node: DockerNode) -> Any:
        """The docker SDK's container object (docker ships no type hints)."""
        assert node._container is not None
        return node._container.get_wrapped_container()

    def _run(self, spec: ContainerSpec) -> DockerNode:
        import docker.errors
        from testcontainers.core.container import DockerContainer

        assert self._network is not None
        node = DockerNode(spec.node, "primary" if spec.node == "primary" else "replica", 0, "")
        self._nodes.append(node)
        options: dict[str, Any] = {"entrypoint": list(spec.entrypoint)}
        if spec.user is not None:
            options["user"] = spec.user
        # The host port is picked here, not by Docker, so that it survives a restart.
        node.container_name = f"{self._prefix}-{spec.node}"
        for attempt in range(3):
            node.port = free_port()
            container = (
                DockerContainer(spec.image)
                .with_name(node.container_name)
                .with_network(self._network)
                .with_network_aliases(spec.node)
                .with_bind_ports(_PORT, node.port)
                .with_command(list(spec.command))
                .with_kwargs(**options)
            )
            for key, value in spec.environment.items():
                container.with_env(key, value)
            node._container = container
            try:
                container.start()
            except docker.errors.APIError as exc:
                container.stop()
                node._container = None
                if attempt == 2 or "port" not in str(exc).lower():
                    raise
                continue
            node.host = container.get_container_host_ip()
            return node
        raise AssertionError("unreachable")  # pragma: no cover

    def _exec(self, node: DockerNode, args: list[str], timeout: float) -> tuple[int, str, str]:
        # exec has no time limit of its own: coreutils' timeout exits 124 when it ends psql.
        command = ["timeout", str(max(1, math.ceil(timeout))), *args]
        result = self._wrapped(node).exec_run(
            command, user="postgres", environment={"PGPASSWORD": self.password}, demux=True
        )
        out, err = result.output
        return (
            int(result.exit_code),
            (out or b"").decode(errors="replace"),
            (err or b"").decode(errors="replace"),
        )

    def _wait_ready(self, node: DockerNode, timeout: float = _READY_TIMEOUT) -> None:
        # Over TCP: the temporary server of the image's first start listens on no port.
        probe = ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(_PORT), "-U", self.user]
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running(node):
                msg = f"{node.name} exited while starting; container log tail:\n{self.logs(node)}"
                raise ClusterError(msg)
            if self._exec(node, probe, 10.0)[0] == 0:
                logger.debug("%s ready in container %s", node.name, node.container_name)
                return
            if time.monotonic() > deadline:
                msg = (
                    f"{node.name} not ready after {timeout}s; "
                    f"container log tail:\n{self.logs(node)}"
                )
                raise ClusterError(msg)
            time.sleep(0.2)
