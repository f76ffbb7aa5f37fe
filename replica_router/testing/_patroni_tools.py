"""How a Patroni cluster runs: its members, configs and processes.

:class:`~replica_router.testing.PatroniCluster` keeps the cluster's state and
fault controls; this module writes the configuration the members start with, and
starts and stops processes as the server user. What they run (Patroni's Python,
etcd) is found by ``_patroni_install``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from replica_router.testing import _watchdog
from replica_router.testing._base import BASE_SETTINGS, ClusterError
from replica_router.testing._binaries import RunAs, ensure_reachable, find_pg_bin

__all__ = ["Launcher", "PatroniMember", "PatroniNotFoundError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCOPE = "replica-router"
NAMESPACE = "/service"
REPLICATION_USER = "replicator"
# Patroni 4 raises a ttl under 20 s to 20 (3.x took 10): a member that crashes
# whole keeps the leader lock that long.
TTL = 20
LOOP_WAIT = 1
RETRY_TIMEOUT = 5  # Patroni requires loop_wait + 2 * retry_timeout <= ttl
ETCD_BIN_ENV = "REPLICA_ROUTER_ETCD_BIN"
INSTALL_HINT = "install the patroni extra: pip install 'replica-router[patroni]'"


class PatroniNotFoundError(RuntimeError):
    """Patroni, its etcd client or driver, or etcd itself is missing or unusable.

    The message says what is missing and how to install it.
    """


@dataclass(eq=False, slots=True)
class PatroniMember:
    """One Patroni node of a :class:`~replica_router.testing.PatroniCluster`.

    Attributes:
        name: ``node-1``, ``node-2``, ...; the Patroni member name and the
            ``application_name`` it streams with.
        port: PostgreSQL's TCP port on 127.0.0.1.
        api_port: Patroni's REST API port on 127.0.0.1.
        directory: The node's directory (``patroni.yml``, ``patroni.log``, ``data/``).
    """

    name: str
    port: int
    api_port: int
    directory: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def api_url(self) -> str:
        """Patroni's REST API, ``http://127.0.0.1:<api_port>``."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def data_dir(self) -> Path:
        """PostgreSQL's data directory."""
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        """Patroni's log, with PostgreSQL's output."""
        return self.directory / "patroni.log"

    def postmaster_pid(self) -> int | None:
        """The pid in PostgreSQL's ``postmaster.pid``, or None without one."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the node's log."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class Launcher:
    """Runs commands as the server user (switching from root) in a clean environment."""

    run_as: RunAs

    def _ids(self) -> dict[str, Any]:
        if not self.run_as.switch:
            return {}
        run_as = self.run_as
        return {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}

    def env(self, home: Path) -> dict[str, str]:
        """Our environment without what would reconfigure the tools (``PG*``, ...)."""
        # Patroni reads PATRONI_*, etcd ETCD_*; the probe proved Patroni without PYTHON*.
        skip = ("PG", "PATRONI_", "ETCD_", "PYTHON")
        env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
        env.update(LC_ALL="C", LANG="C", HOME=str(home))
        return env

    def mkdir(self, path: Path) -> None:
        """Create a directory (0700) owned by the server user."""
        path.mkdir(mode=0o700)
        self.chown(path)

    def chown(self, path: Path) -> None:
        """Give ``path`` to the server user (when we switch to it)."""
        if self.run_as.switch:
            os.chown(path, self.run_as.uid, self.run_as.gid)

    def run(
        self, args: list[str], *, cwd: Path = Path("/"), timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` to completion; raise ``OSError`` or ``SubprocessError`` if it cannot."""
        result: subprocess.CompletedProcess[str] = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=self.env(cwd),
            stdin=subprocess.DEVNULL,
            check=False,
            **self._ids(),
        )
        return result

    def tool(self, binary: Path, args: list[str], *, timeout: float, what: str) -> str:
        """Run a PostgreSQL tool; return its output.

        Raises:
            ClusterError: It failed or timed out.
        """
        try:
            result = self.run([str(binary), *args], timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            msg = f"{what} timed out after {timeout}s"
            raise ClusterError(msg) from exc
        if result.returncode != 0:
            msg = f"{what} failed: {(result.stderr or result.stdout).strip()}"
            raise ClusterError(msg)
        return result.stdout

    def popen(self, args: list[str], cwd: Path, log_file: Path) -> subprocess.Popen[bytes]:
        """Start ``args`` in a session of its own, output appended to ``log_file``."""
        with open(log_file, "ab") as log:
            self.chown(log_file)
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=self.env(cwd),
                start_new_session=True,
                **self._ids(),
            )


def pg_bin_dir(run_as: RunAs, bin_dir: Path | None) -> Path:
    """``bin_dir`` (made reachable) or ``find_pg_bin()``, checked for what Patroni runs.

    Raises:
        PostgresNotFoundError: No usable binaries.
        ClusterError: They lack a tool Patroni needs.
    """
    found = find_pg_bin(run_as.name) if bin_dir is None else ensure_reachable(bin_dir, run_as)
    tools = ("pg_ctl", "pg_rewind", "pg_controldata", "pg_basebackup", "initdb")
    missing = [name for name in tools if not os.access(found / name, os.X_OK)]
    if missing:
        msg = f"{found} lacks {', '.join(missing)}, which Patroni needs"
        raise ClusterError(msg)
    return found


def start_etcd(
    launcher: Launcher, binary: Path, directory: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a one-member etcd working in ``directory``; return it and its client port.

    Raises:
        ClusterError: It did not answer ``/health`` within 30 s.
    """
    log_file = directory / "etcd.log"
    for attempt in range(3):
        client, peer = free_ports(2)
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        args = [
            str(binary),
            "--name=etcd",
            f"--data-dir={directory / 'data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=etcd={peer_url}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # throwaway data, as PostgreSQL's fsync=off
            "--log-level=warn",
        ]
        process = launcher.popen(args, directory, log_file)
        deadline = time.monotonic() + 30.0
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                status, body = http_request(f"{client_url}/health", timeout=1.0)
                if status == 200 and json.loads(body).get("health") == "true":
                    return process, client
            time.sleep(0.05)
        terminate(process, grace=5.0)
        tail = log_file.read_text(errors="replace")[-2000:]
        # A port picked as free may be taken before etcd binds it: try others.
        if attempt < 2 and "address already in use" in tail:
            shutil.rmtree(directory / "data", ignore_errors=True)
            continue
        msg = f"etcd did not start; log tail:\n{tail}"
        raise ClusterError(msg)
    raise AssertionError("unreachable")


def write_member_config(
    launcher: Launcher,
    member: PatroniMember,
    *,
    etcd_port: int,
    bin_dir: Path,
    socket_dir: Path,
    user: str,
    password: str,
    replication_password: str,
    synchronous_mode: bool,
    server_settings: Mapping[str, str],
) -> None:
    """Write a member's ``patroni.yml`` (as JSON, which is YAML), readable by it only."""
    # pg_rewind needs full_page_writes, and wal_log_hints or data checksums.
    rewind = {"full_page_writes": "on", "wal_log_hints": "on", "wal_keep_size": "128MB"}
    parameters = {**BASE_SETTINGS, **rewind, **server_settings}
    host = "127.0.0.1"
    config = {
        "scope": SCOPE,
        "namespace": NAMESPACE + "/",
        "name": member.name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"{host}:{member.api_port}",
            "connect_address": f"{host}:{member.api_port}",
        },
        "etcd3": {"hosts": [f"{host}:{etcd_port}"], "protocol": "http"},
        "bootstrap": {
            # Cluster-wide settings, written to etcd by the member that bootstraps.
            "dcs": {
                "ttl": TTL,
                "loop_wait": LOOP_WAIT,
                "retry_timeout": RETRY_TIMEOUT,
                "maximum_lag_on_failover": 1048576,
                # A leader whose postmaster dies fails over instead of restarting.
                "primary_start_timeout": 0,
                "synchronous_mode": synchronous_mode,
                # Drop a removed member's slot at once (Patroni 4 keeps slots of gone
                # members 30 min, 3.x did not); wal_keep_size covers a crashed one.
                "member_slots_ttl": 0,
                "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": parameters},
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
        },
        "postgresql": {
            "listen": f"{host}:{member.port}",
            "connect_address": f"{host}:{member.port}",
            "data_dir": str(member.data_dir),
            "bin_dir": str(bin_dir),
            "pgpass": str(member.directory / "pgpass"),
            "authentication": {
                "superuser": {"username": user, "password": password},
                "replication": {"username": REPLICATION_USER, "password": replication_password},
            },
            "parameters": {"unix_socket_directories": str(socket_dir)},
            "pg_hba": [
                "local all all trust",
                f"host all all {host}/32 scram-sha-256",
                f"host replication {REPLICATION_USER} {host}/32 scram-sha-256",
            ],
            # A spread checkpoint would hold a new member's copy up for minutes.
            "basebackup": [{"checkpoint": "fast"}],
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
        },
        "watchdog": {"mode": "off"},
    }
    path = member.directory / "patroni.yml"
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    launcher.chown(path)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sockets[-1].bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_request(
    url: str, payload: Mapping[str, object] | None = None, timeout: float = 5.0
) -> tuple[int, str]:
    """GET ``url`` (POST with a JSON body when given one); return status and body.

    Raises:
        OSError: No answer (refused, timed out).
    """
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            return exc.code, exc.read().decode(errors="replace")


def api_post(
    member: PatroniMember, endpoint: str, payload: Mapping[str, object], timeout: float
) -> str:
    """POST ``payload`` to ``endpoint`` of a member's REST API; the answer's body.

    Raises:
        ClusterError: No answer, or an answer other than 200.
    """
    try:
        status, body = http_request(f"{member.api_url}/{endpoint}", payload, timeout=timeout)
    except OSError as exc:
        msg = f"{endpoint}: {member.name}'s REST API did not answer: {exc}"
        raise ClusterError(msg) from exc
    if status != 200:
        raise ClusterError(f"{endpoint} on {member.name} refused ({status}): {body.strip()}")
    return body


def forget_member(etcd_port: int, name: str) -> None:
    """Delete a member's key in etcd (``/v3/kv/deleterange``).

    Raises:
        ClusterError: etcd refused.
    """
    key = base64.b64encode(f"{NAMESPACE}/{SCOPE}/members/{name}".encode()).decode()
    url = f"http://127.0.0.1:{etcd_port}/v3/kv/deleterange"
    status, body = http_request(url, {"key": key})
    if status != 200:
        msg = f"remove_member: etcd refused to delete {name}'s key ({status}): {body}"
        raise ClusterError(msg)


def terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``process``, then SIGKILL it if it is still there after ``grace`` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def poll(check: Callable[[], T | None], timeout: float, message: Callable[[], str]) -> T:
    """Call ``check`` every 0.1 s until it returns something; ``ClusterError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (result := check()) is None:
        if time.monotonic() > deadline:
            raise ClusterError(message())
        time.sleep(0.1)
    return result


def kill_member(member: PatroniMember, socket_dir: Path) -> None:
    """SIGKILL a member's Patroni and all that works in its directory; clear its locks."""
    process, member._process = member._process, None
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    # Patroni, the postmaster and its children all work under the node's directory.
    _watchdog.sweep(str(member.directory.resolve()))
    if process is not None:
        process.wait()
    # A stale lock file whose pid another process took would stop a restart.
    member.data_dir.joinpath("postmaster.pid").unlink(missing_ok=True)
    socket_dir.joinpath(f".s.PGSQL.{member.port}.lock").unlink(missing_ok=True)


def stop_members(members: list[PatroniMember], grace: float, socket_dir: Path) -> None:
    """SIGTERM members' Patroni together (each stops its PostgreSQL), then kill the rest."""
    running = [m._process for m in members if m._process and m._process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    deadline = time.monotonic() + grace
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for member in members:
        kill_member(member, socket_dir)


def remove_base(base: Path, watchdog: subprocess.Popen[bytes] | None) -> None:
    """Stop the watchdog (it sweeps ``base`` on end of file), sweep again, remove ``base``."""
    if watchdog is not None:
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()
    _watchdog.sweep(str(base))
    shutil.rmtree(base, ignore_errors=True)
