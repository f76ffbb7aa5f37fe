"""Topology that changes under the router: a promoted replica is seen at checkout."""

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from replica_router import ReplicaPromotedError, ReplicaRouter, RouterSettings, _nodes
from replica_router._drivers import AsyncpgDriver
from replica_router._nodes import Node
from replica_router.testing import ClusterError, LocalCluster, PatroniCluster

pytestmark = pytest.mark.integration

# Probes once at start, then (practically) never: only the checkout can notice.
NO_PROBES = RouterSettings.defaults(health_interval=3600, read_your_writes="off")


@pytest.fixture
def own_cluster(tmp_path: object) -> Iterator[LocalCluster]:
    with LocalCluster(replicas=2) as cluster:
        cluster.wait_for_replay()  # the only probe must find both replicas caught up
        yield cluster


def idle(node: Node) -> int:
    """Connections sitting in a node's pool."""
    pool = node.engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedin()


async def where(db: AsyncSession) -> str:
    row = (await db.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
    return f"{'replica' if row[0] else 'primary'}:{row[1]}"


async def reads_after_a_promotion(cluster: LocalCluster) -> Counter[str]:
    async with ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=NO_PROBES) as r:
        before: Counter[str] = Counter()
        for _ in range(20):  # pooled connections to both replicas
            async with r.reader_session() as db:
                before[await where(db)] += 1
        assert before[f"replica:{cluster.node('replica-1').port}"] > 0, before
        cluster.promote("replica-1")
        seen: Counter[str] = Counter()
        for _ in range(40):
            async with r.reader_session() as db:
                seen[await where(db)] += 1
        seen["healthy" if r.status().node("replica-1").healthy else "ejected"] += 1
        return seen


async def test_a_promoted_replica_serves_no_read_from_its_next_checkout(
    own_cluster: LocalCluster,
) -> None:
    seen = await reads_after_a_promotion(own_cluster)
    promoted = own_cluster.node("replica-1").port
    assert f"primary:{promoted}" not in seen, seen
    assert seen == Counter({f"replica:{own_cluster.node('replica-2').port}": 40, "ejected": 1})


async def test_counter_proof_without_the_parameter_status_reads_land_on_it(
    own_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without in_hot_standby at checkout, only the next probe (an hour away) would see it.
    monkeypatch.setattr(AsyncpgDriver, "in_hot_standby", lambda self, connection: None)
    seen = await reads_after_a_promotion(own_cluster)
    assert seen[f"primary:{own_cluster.node('replica-1').port}"] > 0, seen


async def a_read_straddling_a_promotion(cluster: LocalCluster) -> tuple[str, str]:
    """A reader session begun on replica-1 while it was in recovery; replica-1 is
    promoted; the session's statement runs. Returns what it gave (or raised), and where
    ``run_read`` then ran the same read."""
    async with ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=NO_PROBES) as r:
        replica_1 = f"replica:{cluster.node('replica-1').port}"
        for _ in range(20):
            async with r.reader_session() as db:
                if await where(db) != replica_1:
                    continue
                await asyncio.to_thread(cluster.promote, "replica-1")
                try:
                    outcome = await where(db)
                except ReplicaPromotedError as exc:
                    outcome = f"refused: {type(exc).__name__}"
                break
        else:
            raise AssertionError("no session landed on replica-1")
        return outcome, await r.run_read(where)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_read_begun_before_a_promotion_is_not_served_by_the_promoted_node(
    own_cluster: LocalCluster, driver: str
) -> None:
    # The server reports in_hot_standby = off with the first answer after its promotion:
    # the statement's result is discarded, and run_read runs the read elsewhere.
    own_cluster.driver = driver  # type: ignore[assignment]
    outcome, rerun = await a_read_straddling_a_promotion(own_cluster)
    assert outcome == "refused: ReplicaPromotedError"
    assert rerun == f"replica:{own_cluster.node('replica-2').port}"


async def test_counter_proof_without_the_guard_the_read_is_served_by_the_promoted_node(
    own_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_nodes, "_guard_statements", lambda node: None)
    outcome, _ = await a_read_straddling_a_promotion(own_cluster)
    assert outcome == f"primary:{own_cluster.node('replica-1').port}"


async def test_replicas_change_while_running(replica_cluster: LocalCluster) -> None:
    one, two = replica_cluster.replica_urls
    settings = RouterSettings.defaults(health_interval=0.2, read_your_writes="off")
    async with ReplicaRouter(replica_cluster.primary_url, [one], settings=settings) as router:
        ports = {replica_cluster.node(n).port: n for n in ("replica-1", "replica-2")}

        async def spread() -> Counter[str]:
            seen: Counter[str] = Counter()
            for _ in range(20):
                async with router.reader_session() as db:
                    port = int((await db.execute(text("SELECT inet_server_port()"))).scalar_one())
                    seen[ports.get(port, "primary")] += 1
            return seen

        assert set(await spread()) == {"replica-1"}
        await router.set_replicas([one, two])  # added: probed before it serves
        assert [n.name for n in router.replicas] == ["replica-1", "replica-2"]
        assert set(await spread()) == {"replica-1", "replica-2"}
        first = router.replicas[0]
        async with router.reader_session() as held:  # a session in flight on replica-1?
            in_flight_on = router.status().node("replica-1").in_flight
            await router.set_replicas([two])  # removed while in flight
            assert (await held.execute(text("SELECT 1"))).scalar() == 1  # not broken
        assert [n.name for n in router.replicas] == ["replica-2"]
        assert set(await spread()) == {"replica-2"}
        # The removed node's pool closes once its sessions ended.
        deadline = 50
        while idle(first) and deadline:
            await asyncio.sleep(0.1)
            deadline -= 1
        assert idle(first) == 0
        assert in_flight_on in (0, 1)


def heal(cluster: PatroniCluster) -> None:
    """Wait for a healthy cluster; a running replica that still does not stream after a
    minute is copied anew from the leader (Patroni's ``POST /reinitialize``). A member
    that an earlier failover left past the fork of the new timeline ("record with
    incorrect prev-link") waits for WAL that never comes, and Patroni does nothing."""
    try:
        cluster.wait_healthy(60.0)
        return
    except ClusterError:
        leader = cluster.leader()
        streaming = cluster.streaming(leader) if leader is not None else set()
    for member in cluster.members:
        if member.name not in streaming | {leader} and cluster.is_running(member.name):
            with contextlib.suppress(ClusterError):  # the wait below says what is wrong
                cluster.reinitialize(member.name)
    cluster.wait_healthy(180.0)


async def test_patroni_members_are_followed(patroni_cluster: PatroniCluster) -> None:
    cluster = patroni_cluster
    for member in cluster.members:  # an earlier test may have crashed or killed some
        if not cluster.is_running(member.name):
            cluster.start_node(member.name, wait=False)
    heal(cluster)
    settings = RouterSettings.defaults(
        health_interval=0.5, read_your_writes="off", patroni_url=",".join(cluster.patroni_urls)
    )
    async with ReplicaRouter(cluster.primary_url, settings=settings) as router:
        leader = cluster.leader()
        expected = {m.name for m in cluster.members} - {leader}  # the streaming ones
        started = time.monotonic()
        while {n.name for n in router.replicas} != expected:
            assert time.monotonic() - started < 2 * settings.health_interval + 3, router.replicas
            await asyncio.sleep(0.1)
        # Patroni's own figure of each member's lag is followed and shown beside the probes'.
        while not all(isinstance(router.status().node(n).patroni_lag_bytes, int) for n in expected):
            assert time.monotonic() - started < 2 * settings.health_interval + 10, router.status()
            await asyncio.sleep(0.1)
        assert all(router.status().node(n).healthy for n in expected)  # within max_lag_bytes
        added = cluster.add_member()
        started = time.monotonic()
        while added not in {n.name for n in router.replicas}:
            assert time.monotonic() - started < 2 * settings.health_interval + 3
            await asyncio.sleep(0.1)
        node = next(n for n in router.replicas if n.name == added)
        served = False
        for _ in range(30):
            async with router.reader_session() as db:
                port = (await db.execute(text("SELECT inet_server_port()"))).scalar()
                served = served or port == cluster.member(added).port
        assert served, "the new member never served a read"
        cluster.remove_member(added)
        started = time.monotonic()
        while added in {n.name for n in router.replicas}:
            assert time.monotonic() - started < 2 * settings.health_interval + 3
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert idle(node) == 0  # its pool was closed
