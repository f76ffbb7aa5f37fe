"""The suite's own set-up: the cluster fixtures from our pytest plugin, and a leak check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytest_plugins = ["replica_router.testing.pytest_plugin"]


def _leftover_servers() -> list[str]:
    """PostgreSQL processes started by a LocalCluster (their data dirs are replica-router-*)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [
        line.strip()
        for line in out.splitlines()
        if "postgres" in line and "/replica-router-" in line
    ]


_BEFORE: set[str] = set()


# Debian packages behind some tests: PgBouncer's, and the pgpool-II and callgrind
# benchmarks of the quick benchmark run. Without them those tests are skipped (saying
# why) or left out, so a fresh Debian machine, where the suite runs as root, gets them.
_DEBIAN_PACKAGES = {"pgbouncer": "pgbouncer", "pgpool": "pgpool2", "valgrind": "valgrind"}


def _install_missing_packages() -> None:
    """``apt-get install`` what is missing, as root on Debian only; never fails the run
    (``REPLICA_ROUTER_NO_APT=1`` turns it off)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    if os.environ.get("REPLICA_ROUTER_NO_APT") == "1":
        return
    missing = [
        package
        for binary, package in _DEBIAN_PACKAGES.items()
        if shutil.which(binary, path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None
    ]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"\ncould not install {' '.join(missing)}: {exc}")
            return
        if done.returncode != 0:
            print(f"\ncould not install {' '.join(missing)}: {done.stderr.strip()[-500:]}")
            return
    print(f"\ninstalled {' '.join(missing)} (Debian packages some tests use)")


def pytest_sessionstart(session: pytest.Session) -> None:
    _install_missing_packages()
    # Servers of another suite running on the same machine are not ours to report.
    _BEFORE.update(_leftover_servers())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Session fixtures (the cluster) are torn down by now: nothing may be left running.
    leftovers = [line for line in _leftover_servers() if line not in _BEFORE]
    if leftovers:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nPostgreSQL servers left running by the suite:\n  " + "\n  ".join(leftovers))
