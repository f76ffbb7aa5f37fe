"""DockerCluster against a real Docker engine: replication, fault controls, cleanup.

Skipped where no Docker engine answers, which is the case where this project is
built and where its CI runs: these tests have not run there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing import ClusterError
from replica_router.testing._base import StopMode
from replica_router.testing.containers import DockerCluster, docker_engine_error

SKIP_REASON = "no Docker engine reachable (the testcontainers backend is not run in CI here)"


def _engine_missing() -> bool:
    try:
        return docker_engine_error() is not None
    except ImportError:
        return True


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_engine_missing(), reason=SKIP_REASON),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[DockerCluster]:
    with DockerCluster(replicas=2) as running:
        running.execute("primary", "CREATE TABLE items (id int PRIMARY KEY, note text)")
        yield running
    assert _containers_named(running) == []


def _containers_named(cluster: DockerCluster) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        names = [c.name for c in client.containers.list(all=True)]
    finally:
        client.close()
    prefix = cluster._prefix
    return [name for name in names if name.startswith(prefix)]


def insert(cluster: DockerCluster, row_id: int) -> None:
    cluster.execute("primary", f"INSERT INTO items VALUES ({row_id}, 'n{row_id}')")


def visible(cluster: DockerCluster, node: str, row_id: int) -> bool:
    return cluster.execute(node, f"SELECT count(*) FROM items WHERE id = {row_id}") == [("1",)]


def test_roles_and_urls(cluster: DockerCluster) -> None:
    assert [n.name for n in cluster.nodes] == ["primary", "replica-1", "replica-2"]
    assert cluster.execute("primary", "SELECT pg_is_in_recovery()") == [("f",)]
    for replica in cluster.replicas:
        assert cluster.execute(replica, "SELECT pg_is_in_recovery()") == [("t",)]
        assert cluster.url(replica).startswith("postgresql+asyncpg://postgres:")
        assert f":{replica.port}/app" in cluster.url(replica)
    ports = {n.port for n in cluster.nodes}
    assert len(ports) == 3


def test_streaming_replication_with_slots(cluster: DockerCluster) -> None:
    insert(cluster, 1)
    cluster.wait_for_replay()
    assert visible(cluster, "replica-1", 1)
    assert visible(cluster, "replica-2", 1)
    rows = cluster.execute(
        "primary", "SELECT application_name, usename FROM pg_stat_replication ORDER BY 1"
    )
    assert rows == [("replica-1", "replicator"), ("replica-2", "replicator")]
    slots = cluster.execute("primary", "SELECT slot_name, active FROM pg_replication_slots")
    assert sorted(slots) == [("replica_1", "t"), ("replica_2", "t")]


def test_pause_and_resume_replay(cluster: DockerCluster) -> None:
    cluster.pause_replay("replica-1")
    insert(cluster, 2)
    cluster.wait_for_replay()  # a paused replica is not waited for
    assert visible(cluster, "replica-2", 2)
    assert not visible(cluster, "replica-1", 2)
    cluster.resume_replay("replica-1")
    cluster.wait_for_replay()
    assert visible(cluster, "replica-1", 2)


def test_kill_and_start_a_replica(cluster: DockerCluster) -> None:
    port = cluster.node("replica-2").port
    cluster.kill_node("replica-2")
    assert not cluster.is_running("replica-2")
    with pytest.raises(ClusterError, match="not running"):
        cluster.execute("replica-2", "SELECT 1")
    insert(cluster, 3)
    cluster.start_node("replica-2")
    assert cluster.node("replica-2").port == port  # the URL stays valid
    cluster.wait_for_replay()
    assert visible(cluster, "replica-2", 3)


MODES: list[StopMode] = ["smart", "fast", "immediate"]


@pytest.mark.parametrize("mode", MODES)
def test_stop_modes_and_restart_of_the_primary(cluster: DockerCluster, mode: StopMode) -> None:
    cluster.stop_node("primary", mode)
    assert not cluster.is_running("primary")
    cluster.start_node("primary")
    insert(cluster, 10 + len(mode))
    cluster.wait_for_replay()  # the replicas reconnected
    assert visible(cluster, "replica-1", 10 + len(mode))


def test_restart_node(cluster: DockerCluster) -> None:
    cluster.restart_node("replica-1")
    assert cluster.is_running("replica-1")
    assert cluster.execute("replica-1", "SELECT pg_is_in_recovery()") == [("t",)]


async def test_router_reads_from_the_replicas(cluster: DockerCluster) -> None:
    settings = RouterSettings.defaults(health_interval=0.2, health_timeout=2.0)
    router = ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=settings)
    async with router:
        async with router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar() is True
        async with router.writer_session() as db:
            await db.execute(text("INSERT INTO items VALUES (100, 'router')"))


def test_promote_a_replica() -> None:
    with DockerCluster(replicas=1) as own:
        own.promote("replica-1")
        assert own.node("replica-1").role == "primary"
        assert own.execute("replica-1", "SELECT pg_is_in_recovery()") == [("f",)]
        own.execute("replica-1", "CREATE TABLE after_promotion (id int)")
    assert _containers_named(own) == []
