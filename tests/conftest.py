"""The suite's own set-up: the cluster fixtures from our pytest plugin, and a leak check."""

from __future__ import annotations

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


def pytest_sessionstart(session: pytest.Session) -> None:
    # Servers of another suite running on the same machine are not ours to report.
    _BEFORE.update(_leftover_servers())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Session fixtures (the cluster) are torn down by now: nothing may be left running.
    leftovers = [line for line in _leftover_servers() if line not in _BEFORE]
    if leftovers:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nPostgreSQL servers left running by the suite:\n  " + "\n  ".join(leftovers))
