"""Finding the ``pgbouncer`` binary, and checking that the server user can run it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from replica_router.testing._binaries import RunAs

__all__ = ["PGBOUNCER_ENV", "PgBouncerNotFoundError", "find_pgbouncer", "ids", "version"]

PGBOUNCER_ENV = "REPLICA_ROUTER_PGBOUNCER"
SYSTEM_PGBOUNCER = Path("/usr/sbin/pgbouncer")
_VERSION = re.compile(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?")


class PgBouncerNotFoundError(RuntimeError):
    """No usable ``pgbouncer`` binary was found; the message says how to get one."""


def _install_hint() -> str:
    return (
        "install PgBouncer (Debian/Ubuntu: apt-get install pgbouncer; macOS: brew install "
        f"pgbouncer) or set {PGBOUNCER_ENV} to the path of a pgbouncer binary"
    )


def find_pgbouncer(binary: str | Path | None = None) -> Path:
    """Find the ``pgbouncer`` binary.

    Args:
        binary: An explicit path; when omitted, ``REPLICA_ROUTER_PGBOUNCER``, then
            ``pgbouncer`` on ``PATH``, then ``/usr/sbin/pgbouncer``.

    Raises:
        PgBouncerNotFoundError: The explicit path or the variable names no
            executable file, or no source gave one.
    """
    explicit = str(binary) if binary is not None else os.environ.get(PGBOUNCER_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        source = "binary" if binary is not None else PGBOUNCER_ENV
        msg = f"{source}={explicit!r} is not an executable file; {_install_hint()}"
        raise PgBouncerNotFoundError(msg)
    on_path = shutil.which("pgbouncer")
    if on_path is not None:
        return Path(on_path)
    if SYSTEM_PGBOUNCER.is_file() and os.access(SYSTEM_PGBOUNCER, os.X_OK):
        return SYSTEM_PGBOUNCER
    msg = (
        f"pgbouncer not found ({PGBOUNCER_ENV} not set, not on PATH, "
        f"no {SYSTEM_PGBOUNCER}); {_install_hint()}"
    )
    raise PgBouncerNotFoundError(msg)


def ids(run_as: RunAs) -> tuple[int | None, int | None, list[int] | None]:
    """``user``, ``group`` and ``extra_groups`` for subprocesses: switch when root."""
    if not run_as.switch:
        return None, None, None
    return run_as.uid, run_as.gid, list(run_as.groups)


def version(binary: Path, run_as: RunAs) -> str:
    """The ``x.y.z`` version of ``binary``, run as ``run_as`` (checks it can execute)."""
    uid, gid, groups = ids(run_as)
    try:
        out = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        msg = f"cannot execute {binary} as {run_as.name}: {exc}; {_install_hint()}"
        raise PgBouncerNotFoundError(msg) from exc
    found = _VERSION.search(out.stdout + out.stderr)
    if out.returncode != 0 or found is None:
        detail = (out.stderr or out.stdout).strip()
        msg = f"{binary} --version failed as {run_as.name}: {detail}; {_install_hint()}"
        raise PgBouncerNotFoundError(msg)
    return ".".join(part or "0" for part in found.groups())
