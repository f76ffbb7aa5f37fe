"""Nodes behind PgBouncer in transaction pooling mode (REPLICA_ROUTER_POOLER=transaction).

With ``pooler="transaction"`` the router configures each driver so that no named
prepared statement outlives its transaction (asyncpg: ``statement_cache_size=0``;
psycopg: ``prepare_threshold=None``). The counter-proof runs the same load with
``pooler="none"`` and sees the prepared-statement errors users hit.
"""

import asyncio
from collections import Counter

import pytest
from sqlalchemy import String, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing import LocalCluster, PgBouncer
from replica_router.testing.pytest_plugin import DRIVERS

pytestmark = pytest.mark.integration
BOTH_DRIVERS = pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)

TASKS = 8
UNITS = 125  # per task: 8 x 125 = 1,000 units of work, half reads, half writes
# Errors a transaction-mode pooler gives named prepared statements: 26000 (does not
# exist on this server connection), 42P05 (already exists there).
PREPARED_STATEMENT_ERRORS = {"26000", "42P05"}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pooled_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    k: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def items(replica_cluster: LocalCluster) -> None:
    replica_cluster.execute(
        "primary",
        "DROP TABLE IF EXISTS pooled_items;"
        "CREATE TABLE pooled_items (id serial PRIMARY KEY, k varchar(40) NOT NULL);"
        "INSERT INTO pooled_items (k) SELECT 'seed-' || g FROM generate_series(1, 50) g",
    )
    replica_cluster.wait_for_replay()


async def load(router: ReplicaRouter) -> Counter[str]:
    """1,000 ORM units of work through the router; counts outcomes by SQLSTATE."""
    outcomes: Counter[str] = Counter()

    async def write(db: AsyncSession, n: int) -> None:
        db.add(Item(k=f"w-{n}"))
        await db.flush()

    async def read(db: AsyncSession, n: int) -> None:
        await db.get(Item, n % 50 + 1)
        await db.scalar(select(func.count()).select_from(Item).where(Item.k == f"seed-{n}"))

    async def task(index: int) -> None:
        for n in range(UNITS):
            try:
                if n % 2:
                    async with router.writer_session() as db:
                        await write(db, index * UNITS + n)
                else:
                    async with router.reader_session(read_your_writes="off") as db:
                        await read(db, n)
                outcomes["ok"] += 1
            except DBAPIError as exc:
                outcomes[getattr(exc.orig, "sqlstate", None) or type(exc.orig).__name__] += 1

    await asyncio.gather(*(task(i) for i in range(TASKS)))
    return outcomes


def pooled_router(bouncer: PgBouncer, pooler: str) -> ReplicaRouter:
    settings = RouterSettings.defaults(
        pooler=pooler, health_interval=0.2, pool_size=4, max_overflow=0
    )
    return ReplicaRouter(bouncer.primary_url, bouncer.replica_urls, settings=settings)


@BOTH_DRIVERS
async def test_a_thousand_orm_units_through_pgbouncer_with_the_setting(
    replica_cluster: LocalCluster, pgbouncer: PgBouncer, items: None
) -> None:
    async with pooled_router(pgbouncer, "transaction") as router:
        outcomes = await load(router)
        # The reads went to replicas through their bouncers, the writes to the primary.
        status = router.status()
        assert all(n.sessions > 0 for n in status.nodes), status
        async with router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is True
    assert outcomes == Counter(ok=TASKS * UNITS)


@BOTH_DRIVERS
async def test_counter_proof_without_the_setting_prepared_statements_break(
    replica_cluster: LocalCluster, pgbouncer: PgBouncer, items: None
) -> None:
    outcomes: Counter[str] = Counter()
    for _ in range(3):  # psycopg prepares after 5 runs of a statement: give it rounds
        async with pooled_router(pgbouncer, "none") as router:
            outcomes += await load(router)
        if PREPARED_STATEMENT_ERRORS & set(outcomes):
            break
    assert PREPARED_STATEMENT_ERRORS & set(outcomes), outcomes
