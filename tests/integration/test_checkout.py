"""A reader's checkout takes its pooled connection without a greenlet when nothing
there awaits, and with one whenever something might.

``await session.connection()`` runs SQLAlchemy's checkout in a new greenlet, and each
greenlet maps a fresh Python frame stack (about a tenth of what a read costs the
router). With asyncpg, taking an idle pooled connection awaits nothing, so the router
calls the ORM's ``Session.connection()`` directly; when every connection is out, it
waits for its turn outside the greenlet first (first come, first served), then does
the same. Whatever could do I/O there keeps the greenlet: no idle connection and room
for another (a new one is opened), ``pool_pre_ping``, a
connection past ``pool_recycle``, a listener that may run a statement (a session's
``after_begin``), and psycopg, whose adapter awaits to set the read-only flag. Each
case is run for real: it works, and it took the path it should. Counter-proof (run by
hand): a predicate that only asks for an idle connection fails the four I/O cases
(``MissingGreenlet``, or a pre-ping, recycle or ``SET LOCAL`` that never ran).

The checkout's BEGIN bound is asyncpg's own statement timer, pinned here too.
"""

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from replica_router import ReplicaRouter, RouterSettings
from replica_router._pool import FairAsyncQueuePool, HandOffQueue
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


async def test_a_contended_checkout_waits_its_turn_without_a_greenlet(
    replica_cluster: LocalCluster, greenlet_checkouts: list[str]
) -> None:
    # Every connection out: the checkout waits for a returned one outside the greenlet,
    # first come, first served, and then takes it as an idle one.
    settings = RouterSettings.defaults(
        health_interval=3600, read_your_writes="off", pool_size=1, max_overflow=0
    )
    replica = replica_cluster.replica_urls[:1]
    async with ReplicaRouter(replica_cluster.primary_url, replica, settings=settings) as router:
        assert await reads(router, 1) == [True]  # the one connection is opened
        greenlet_checkouts.clear()
        served: list[int] = []

        async def read(number: int) -> None:
            async with router.reader_session() as db:
                served.append(number)
                await db.execute(text("SELECT pg_sleep(0.02)"))

        await asyncio.gather(*(read(n) for n in range(6)))
        assert served == list(range(6))
        assert greenlet_checkouts == []


async def test_a_turn_past_the_pool_timeout_is_sqlalchemys_timeout_and_loses_nothing(
    replica_cluster: LocalCluster,
) -> None:
    settings = NO_PROBES.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2})
    replica = replica_cluster.replica_urls[:1]
    async with ReplicaRouter(replica_cluster.primary_url, replica, settings=settings) as router:
        async with router.reader_session():
            with pytest.raises(sa_exc.TimeoutError, match="QueuePool limit of size 1 overflow 0"):
                async with router.reader_session():
                    pass  # pragma: no cover
        pool = router.replicas[0].engine.sync_engine.pool
        assert isinstance(pool, FairAsyncQueuePool) and isinstance(pool._pool, HandOffQueue)
        assert not pool._pool._waiters
        assert await reads(router, 2) == [True, True]  # the connection is still there
        assert router.replicas[0].state.up  # a full pool is not a down node


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


async def test_the_begin_bound_is_asyncpgs_own_timer_and_is_put_back(
    replica_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg's Transaction.start takes no timeout: the BEGIN runs with the connection's
    # command_timeout set to the bound. Each later statement has READ_TIMEOUT again on
    # a replica, and no bound at all on the primary.
    seen: list[tuple[str, float | None]] = []
    execute = asyncpg.Connection.execute

    async def recording(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        seen.append((query.split()[0], self._config.command_timeout))
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "execute", recording)
    async with one_replica(replica_cluster) as router:
        await reads(router, 3)  # a known latency: the bound is its 0.25 s floor
        seen.clear()
        async with router.reader_session() as db:
            await db.execute(text("SELECT 1"))
            after = await command_timeout(db)
        async with router.writer_session() as db:
            after_on_primary = await command_timeout(db)
    begins = [timeout for command, timeout in seen if command == "BEGIN"]
    assert begins[0] == pytest.approx(0.25)  # the reader's BEGIN: the bound
    assert (after, after_on_primary) == (NO_PROBES.read_timeout, None)


async def command_timeout(db: AsyncSession) -> Any:
    raw = (await (await db.connection()).get_raw_connection()).driver_connection
    assert raw is not None
    return raw._config.command_timeout
