"""A reader's checkout takes its pooled connection without a greenlet when nothing
there awaits, and with one whenever something might.

``await session.connection()`` runs SQLAlchemy's checkout in a new greenlet, and each
greenlet maps a fresh Python frame stack (about a tenth of what a read costs the
router). With asyncpg, taking an idle pooled connection awaits nothing, so the router
calls the ORM's ``Session.connection()`` directly. Whatever could do I/O there keeps
the greenlet: no idle connection (a new one is opened), ``pool_pre_ping``, a
connection past ``pool_recycle``, a listener that may run a statement (a session's
``after_begin``), and psycopg, whose adapter awaits to set the read-only flag. Each
case is run for real: it works, and it took the path it should. Counter-proof (run by
hand): a predicate that only asks for an idle connection fails the four I/O cases
(``MissingGreenlet``, or a pre-ping, recycle or ``SET LOCAL`` that never ran).
"""

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

NO_PROBES = RouterSettings.defaults(health_interval=3600, read_your_writes="off")


@pytest.fixture
def greenlet_checkouts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each ``AsyncSession.connection()`` (the greenlet path)."""
    seen: list[str] = []
    original = AsyncSession.connection

    async def connection(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        seen.append("greenlet")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "connection", connection)
    return seen


def one_replica(cluster: LocalCluster, **options: Any) -> ReplicaRouter:
    return ReplicaRouter(
        cluster.primary_url, cluster.replica_urls[:1], settings=NO_PROBES, **options
    )


async def reads(router: ReplicaRouter, count: int) -> list[object]:
    """Where ``count`` reads ran (``pg_is_in_recovery()``), one after the other."""
    seen = []
    for _ in range(count):
        async with router.reader_session() as db:
            seen.append((await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one())
    return seen


async def test_an_idle_pooled_connection_is_taken_without_a_greenlet(
    replica_cluster: LocalCluster, greenlet_checkouts: list[str]
) -> None:
    async with one_replica(replica_cluster) as router:
        assert await reads(router, 1) == [True]
        assert greenlet_checkouts == ["greenlet"]  # the pool was empty: a connect
        assert await reads(router, 5) == [True] * 5
        assert greenlet_checkouts == ["greenlet"]


@pytest.mark.parametrize(
    "engine_options",
    [{"pool_pre_ping": True}, {"pool_recycle": 0.2}],
    ids=["pre_ping", "recycle"],
)
async def test_a_checkout_that_may_do_io_keeps_its_greenlet(
    replica_cluster: LocalCluster, greenlet_checkouts: list[str], engine_options: dict[str, Any]
) -> None:
    async with one_replica(replica_cluster, engine_options=engine_options) as router:
        await reads(router, 1)
        greenlet_checkouts.clear()
        if "pool_recycle" in engine_options:
            await asyncio.sleep(0.3)  # the pooled connection is past its recycle age
            assert await reads(router, 1) == [True]
            assert greenlet_checkouts == ["greenlet"]
        else:
            assert await reads(router, 3) == [True] * 3
            assert greenlet_checkouts == ["greenlet"] * 3


async def test_a_session_listener_that_runs_a_statement_keeps_its_greenlet(
    replica_cluster: LocalCluster, greenlet_checkouts: list[str]
) -> None:
    class TimedSession(Session):
        pass

    def set_timeout(session: Session, transaction: object, connection: Any) -> None:
        connection.execute(text("SET LOCAL statement_timeout = '4s'"))

    event.listen(TimedSession, "after_begin", set_timeout)
    async with one_replica(
        replica_cluster, session_options={"sync_session_class": TimedSession}
    ) as router:
        for _ in range(3):
            async with router.reader_session() as db:
                shown = (await db.execute(text("SHOW statement_timeout"))).scalar_one()
                assert shown == "4s"
        assert greenlet_checkouts == ["greenlet"] * 3


@pytest.mark.parametrize("replica_cluster", ["psycopg"], indirect=True)
async def test_psycopg_keeps_its_greenlet(
    replica_cluster: LocalCluster, greenlet_checkouts: list[str]
) -> None:
    async with one_replica(replica_cluster) as router:
        assert await reads(router, 3) == [True] * 3
        assert greenlet_checkouts == ["greenlet"] * 3
