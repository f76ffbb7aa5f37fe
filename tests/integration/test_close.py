"""Sessions end cheaply and cleanly: a reader's rollback goes through the driver and
the ORM's close runs without a greenlet of its own (each greenlet costs a fresh frame
stack: a page fault and two system calls), and whatever path a close takes, the
connection is back in its pool, outside any transaction, and works for the next one.
"""

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

DRIVERS = ["asyncpg", "psycopg"]


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each AsyncSession.close (the greenlet path), by the session's bind."""
    seen: list[str] = []
    original = AsyncSession.close

    async def close(self: AsyncSession) -> None:
        seen.append("AsyncSession.close")
        await original(self)

    monkeypatch.setattr(AsyncSession, "close", close)
    return seen


def idle(router: ReplicaRouter, name: str) -> int:
    node = next(n for n in router.nodes if n.name == name)
    pool = node.engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedin()


def in_transaction(cluster: LocalCluster, node: str) -> list[Any]:
    """The router's backends on ``node`` that are inside a transaction."""
    return cluster.execute(
        node,
        "SELECT pid, state FROM pg_stat_activity WHERE application_name = 'replica-router' "
        "AND state LIKE 'idle in transaction%'",
    )


@pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)
async def test_a_closed_session_leaves_its_connection_idle_and_usable(
    replica_cluster: LocalCluster, closes: list[str]
) -> None:
    settings = RouterSettings.defaults(read_your_writes="off", pool_size=2, max_overflow=0)
    primary = replica_cluster.primary_url
    async with ReplicaRouter(primary, replica_cluster.replica_urls[:1], settings=settings) as r:
        for _ in range(3):
            async with r.reader_session() as db:
                assert (await db.execute(text("SELECT 1"))).scalar() == 1
        assert idle(r, "replica-1") == 1
        assert in_transaction(replica_cluster, "replica-1") == []
        async with r.writer_session() as db:
            await db.execute(text("SELECT 1"))  # committed, then closed
        async with r.writer_session() as db:
            pass  # begun (the eager BEGIN), never used: rolled back
        assert in_transaction(replica_cluster, "primary") == []
        # A savepoint: the ORM's own close (a greenlet) rolls it all back.
        async with r.reader_session() as db:
            await db.begin_nested()
            await db.execute(text("SELECT 1"))
        assert in_transaction(replica_cluster, "replica-1") == []
        async with r.reader_session() as db:  # the connections still work
            assert (await db.execute(text("SELECT 2"))).scalar() == 2
    if replica_cluster.driver == "asyncpg":
        # Only the savepoint's session took the greenlet path.
        assert closes == ["AsyncSession.close"]
    else:
        # psycopg: SQLAlchemy's close for every reader; the writers had committed.
        assert len(closes) == 5


async def test_a_connection_the_pool_would_close_takes_the_orms_close(
    replica_cluster: LocalCluster, closes: list[str]
) -> None:
    # pool 1 + overflow 1: the second connection returned finds the pool full and is
    # closed, which is I/O: the ORM's close (a greenlet) does it.
    settings = RouterSettings.defaults(read_your_writes="off", pool_size=1, max_overflow=1)
    primary = replica_cluster.primary_url
    async with ReplicaRouter(primary, replica_cluster.replica_urls[:1], settings=settings) as r:
        first = r.reader_session()
        second = r.reader_session()
        one = await first.__aenter__()
        two = await second.__aenter__()
        await one.execute(text("SELECT 1"))
        await two.execute(text("SELECT 1"))
        await first.__aexit__(None, None, None)
        assert closes == []  # the pool kept it
        await second.__aexit__(None, None, None)
        assert closes == ["AsyncSession.close"]
        assert idle(r, "replica-1") == 1
        async with r.reader_session() as db:
            assert (await db.execute(text("SELECT 3"))).scalar() == 3


async def test_a_rollback_on_a_lost_connection_drops_it(replica_cluster: LocalCluster) -> None:
    settings = RouterSettings.defaults(read_your_writes="off", pool_size=1, max_overflow=0)
    primary = replica_cluster.primary_url
    async with ReplicaRouter(primary, replica_cluster.replica_urls[:1], settings=settings) as r:
        async with r.reader_session() as db:
            pid = (await db.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            replica_cluster.execute("replica-1", f"SELECT pg_terminate_backend({int(pid)})")
        # The rollback failed: the connection was dropped, so the next checkout opens a
        # new one instead of failing on the dead one.
        async with r.reader_session() as db:
            assert (await db.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
        replica = next(n for n in r.nodes if n.name == "replica-1")
        assert replica.state.checkout_failures == 0
        assert r.status().node("replica-1").healthy


async def test_sessions_closing_at_once_never_close_a_connection_without_a_greenlet(
    replica_cluster: LocalCluster, closes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Both rollbacks are in flight before either returns its connection: the second
    # finds the pool full only after its rollback, and must then take the ORM's close.
    settings = RouterSettings.defaults(read_your_writes="off", pool_size=1, max_overflow=1)
    primary = replica_cluster.primary_url
    async with ReplicaRouter(primary, replica_cluster.replica_urls[:1], settings=settings) as r:
        managers = [r.reader_session(), r.reader_session()]
        sessions = [await m.__aenter__() for m in managers]
        for db in sessions:
            await db.execute(text("SELECT 1"))
        await asyncio.gather(*(m.__aexit__(None, None, None) for m in managers))
        assert closes == ["AsyncSession.close"]
        assert "Exception closing connection" not in caplog.text
        assert idle(r, "replica-1") == 1


async def test_a_close_cancelled_mid_rollback_drops_the_connection(
    replica_cluster: LocalCluster,
) -> None:
    # A client that disconnects while its session's ROLLBACK waits on a frozen server:
    # the connection goes, it does not stay checked out or come back mid-protocol.
    settings = RouterSettings.defaults(read_your_writes="off", pool_size=2, max_overflow=0)
    primary = replica_cluster.primary_url
    async with ReplicaRouter(primary, replica_cluster.replica_urls[:1], settings=settings) as r:
        manager = r.reader_session()
        db = await manager.__aenter__()
        pid = (await db.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        replica_cluster.freeze_node("replica-1")
        try:
            closing = asyncio.create_task(manager.__aexit__(None, None, None))
            await asyncio.sleep(0.3)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        finally:
            replica_cluster.thaw_node("replica-1")
        replica = next(n for n in r.nodes if n.name == "replica-1")
        pool = replica.engine.sync_engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedout() == 0
        async with r.reader_session() as again:
            assert (await again.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
