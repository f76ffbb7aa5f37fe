"""PatroniCluster against real Patroni, etcd and PostgreSQL: failover, rejoin, membership."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from replica_router.testing import PatroniCluster, PatroniNotFoundError
from replica_router.testing._binaries import server_user
from replica_router.testing._patroni_install import find_etcd, patroni_command
from replica_router.testing._patroni_tools import Launcher
from replica_router.testing._watchdog import processes_under

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def leftovers(base: Path) -> list[str]:
    """Processes working under ``base`` or naming it on their command line."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    named = [
        line.strip()
        for line in out.splitlines()
        if str(base) in line and not line.split()[1].startswith("Z")
    ]
    return named + [str(pid) for pid in processes_under(str(base))]


def started(cluster: PatroniCluster) -> PatroniCluster:
    try:
        return cluster.start()
    except PatroniNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def cluster(patroni_cluster: PatroniCluster) -> PatroniCluster:
    """The plugin's session cluster, every member running and streaming."""
    for member in patroni_cluster.members:
        if not patroni_cluster.is_running(member.name):
            patroni_cluster.start_node(member.name, wait=False)
    leader = patroni_cluster.wait_healthy(timeout=60)
    patroni_cluster.execute(leader, "CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY)")
    return patroni_cluster


def others(cluster: PatroniCluster, leader: str) -> set[str]:
    return {m.name for m in cluster.members if m.name != leader}


def insert(cluster: PatroniCluster, leader: str, row_id: int) -> None:
    cluster.execute(leader, f"INSERT INTO items VALUES ({row_id})")


def wait_visible(cluster: PatroniCluster, name: str, row_id: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    query = f"SELECT count(*) FROM items WHERE id = {row_id}"
    while cluster.execute(name, query) != [("1",)]:
        assert time.monotonic() < deadline, f"row {row_id} not visible on {name}"
        time.sleep(0.05)


def test_leader_and_two_streaming_replicas(cluster: PatroniCluster) -> None:
    leader = cluster.leader()
    assert leader is not None
    assert [m.name for m in cluster.members] == ["node-1", "node-2", "node-3"]
    assert sorted(cluster.roles().items()) == sorted(
        [(leader, "leader")] + [(name, "replica") for name in others(cluster, leader)]
    )
    assert cluster.streaming(leader) == others(cluster, leader)
    assert cluster.execute(leader, "SELECT pg_is_in_recovery()") == [("f",)]
    for name in others(cluster, leader):
        assert cluster.execute(name, "SELECT pg_is_in_recovery()") == [("t",)]
    ports = [m.port for m in cluster.members]
    hosts = "&".join(f"host=127.0.0.1:{port}" for port in ports)
    assert cluster.primary_url == (
        f"postgresql+asyncpg://postgres:{cluster.password}@/app?{hosts}"
        "&target_session_attrs=read-write"
    )
    assert cluster.replica_urls[1] == (
        f"postgresql+asyncpg://postgres:{cluster.password}@127.0.0.1:{ports[1]}/app"
        "?replica_name=node-2"
    )
    assert cluster.patroni_urls == [f"http://127.0.0.1:{m.api_port}" for m in cluster.members]
    assert cluster.password not in repr(cluster)


async def test_primary_url_reaches_the_leader(cluster: PatroniCluster) -> None:
    leader = cluster.member(cluster.wait_healthy())
    engine = create_async_engine(cluster.primary_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT inet_server_port(), current_database()"))).one()
    finally:
        await engine.dispose()
    assert tuple(row) == (leader.port, "app")


def test_write_on_leader_replays(cluster: PatroniCluster) -> None:
    leader = cluster.wait_healthy()
    insert(cluster, leader, 1)
    for name in others(cluster, leader):
        wait_visible(cluster, name, 1)


def test_switchover_moves_the_leader(cluster: PatroniCluster) -> None:
    old = cluster.wait_healthy()
    candidate = sorted(others(cluster, old))[0]
    new = cluster.switchover(candidate)
    assert new == candidate
    assert cluster.wait_healthy(timeout=60) == new
    assert old in cluster.streaming(new)


def test_killed_postmaster_fails_over(cluster: PatroniCluster) -> None:
    old = cluster.kill_leader_postmaster()
    began = time.monotonic()
    new = cluster.wait_for_leader(timeout=cluster.ttl + 20, exclude=old)
    # primary_start_timeout 0: no waiting for the lock to expire (measured 1.6-3.2 s).
    assert time.monotonic() - began < 10
    assert new != old
    insert(cluster, new, 2)
    assert cluster.wait_healthy(timeout=60) == new
    wait_visible(cluster, old, 2)  # the old leader was rewound and follows


def test_crashed_leader_rejoins(cluster: PatroniCluster) -> None:
    old = cluster.wait_healthy()
    cluster.crash_node(old)
    assert not cluster.is_running(old)
    assert processes_under(str(cluster.member(old).directory)) == []
    began = time.monotonic()
    new = cluster.wait_for_leader(timeout=cluster.ttl + 20, exclude=old)
    assert time.monotonic() - began < cluster.ttl + 5
    insert(cluster, new, 3)
    cluster.start_node(old)
    assert old in cluster.streaming(new)
    wait_visible(cluster, old, 3)


def test_add_and_remove_member(cluster: PatroniCluster) -> None:
    leader = cluster.wait_healthy()
    name = cluster.add_member()
    assert name == "node-4"
    assert name in cluster.streaming(leader)
    assert len(cluster.replica_urls) == 4
    assert cluster.primary_url.count("host=") == 4
    cluster.remove_member(name)
    assert [m.name for m in cluster.members] == ["node-1", "node-2", "node-3"]
    assert name not in cluster.streaming(leader)
    assert sorted(cluster.roles()) == ["node-1", "node-2", "node-3"]
    # The leader drops the removed member's replication slot within a loop or two.
    deadline = time.monotonic() + 10
    while cluster.execute(leader, "SELECT slot_name FROM pg_replication_slots ORDER BY 1") != [
        (m.replace("-", "_"),) for m in sorted(others(cluster, leader))
    ]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_reinitialized_replica_is_copied_anew(cluster: PatroniCluster) -> None:
    """What the suite's heal() does for a member stuck past a timeline's fork: its data
    directory is taken anew from the leader, and it streams again."""
    leader = cluster.wait_healthy()
    name = sorted(others(cluster, leader))[0]
    member = cluster.member(name)
    marker = member.data_dir / "rr-before-reinitialize"
    marker.touch()  # in no base backup: gone only if the directory was copied anew
    before = member.postmaster_pid()
    insert(cluster, leader, 4)
    cluster.reinitialize(name)
    assert not marker.exists()
    assert member.postmaster_pid() not in (None, before)
    assert name in cluster.streaming(leader)
    wait_visible(cluster, name, 4)


def test_synchronous_mode_and_clean_stop() -> None:
    with started(PatroniCluster(size=2, synchronous_mode=True, database="postgres")) as small:
        base = small.base_dir
        assert base is not None
        leader = small.wait_healthy()
        deadline = time.monotonic() + 20
        query = "SELECT application_name, sync_state FROM pg_stat_replication"
        while small.execute(leader, query) != [(*others(small, leader), "sync")]:
            assert time.monotonic() < deadline, small.execute(leader, query)
            time.sleep(0.1)
        assert leftovers(base) != []
    assert leftovers(base) == []
    assert not base.exists()


WATCHDOG_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from replica_router.testing import PatroniCluster
    cluster = PatroniCluster(size=1).start()
    print(cluster.base_dir, flush=True)
    time.sleep(600)
    """
)


def test_watchdog_cleans_up_after_sigkill() -> None:
    launcher = Launcher(server_user())
    try:
        patroni_command(launcher)
        find_etcd(launcher)
    except PatroniNotFoundError as exc:
        pytest.skip(str(exc))
    child = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG_CHILD.format(root=str(REPO_ROOT))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line, "the child could not start a cluster (see its stderr above)"
        base = Path(line)
        assert base.is_dir()
        assert leftovers(base) != []
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 15
    while (leftovers(base) or base.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(base) == []
    assert not base.exists()
