"""The core promises, on a real primary and streaming replicas (design.md, promises 1-3)."""

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import QueuePool

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing import LocalCluster
from replica_router.testing.pytest_plugin import DRIVERS

pytestmark = pytest.mark.integration
# The promise tests run once per driver: the cluster's URLs name asyncpg, then psycopg.
BOTH_DRIVERS = pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)

FAST = RouterSettings.defaults(health_interval=0.2, health_timeout=1.0)


@pytest.fixture
def table(replica_cluster: LocalCluster) -> str:
    """A table whose unique key is checked only at COMMIT (fails there, not before)."""
    replica_cluster.execute(
        "primary",
        "DROP TABLE IF EXISTS items; CREATE TABLE items ("
        " id serial PRIMARY KEY, k text NOT NULL,"
        " CONSTRAINT items_k_key UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)",
    )
    replica_cluster.wait_for_replay()
    return "items"


def client(app: FastAPI) -> httpx.AsyncClient:
    # raise_app_exceptions=False: see the 500 a user would see, not a re-raised error.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def count(router: ReplicaRouter, where: str = "true") -> int:
    async with router.primary.sessionmaker() as db:
        return int(
            (await db.execute(text(f"SELECT count(*) FROM items WHERE {where}"))).scalar_one()
        )


def items_app(router: ReplicaRouter) -> FastAPI:
    app = FastAPI()
    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]

    @app.post("/items/{k}")
    async def create(k: str, db: Writer) -> dict[str, str]:
        await db.execute(text("INSERT INTO items (k) VALUES (:k)"), {"k": k})
        return {"k": k}

    @app.post("/items/{k}/refuse")
    async def create_then_refuse(k: str, db: Writer) -> dict[str, str]:
        await db.execute(text("INSERT INTO items (k) VALUES (:k)"), {"k": k})
        raise HTTPException(status_code=409, detail="refused")

    @app.post("/items/{k}/crash")
    async def create_then_crash(k: str, db: Writer) -> dict[str, str]:
        await db.execute(text("INSERT INTO items (k) VALUES (:k)"), {"k": k})
        raise RuntimeError("bug in the endpoint")

    @app.post("/items/{k}/bad-response")
    async def create_bad_response(k: str, db: Writer) -> dict[str, int]:
        await db.execute(text("INSERT INTO items (k) VALUES (:k)"), {"k": k})
        return {"k": "not an int"}  # type: ignore[dict-item]

    @app.get("/where")
    async def where(db: Reader) -> dict[str, object]:
        row = (await db.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
        return {"in_recovery": row[0], "port": row[1]}

    @app.post("/write-through-reader/{k}")
    async def write_through_reader(k: str, db: Reader) -> dict[str, str]:
        await db.execute(text("INSERT INTO items (k) VALUES (:k)"), {"k": k})
        return {"k": k}

    return app


@BOTH_DRIVERS
async def test_reader_on_replica_writer_on_primary(replica_router: ReplicaRouter) -> None:
    async with replica_router.reader_session() as db:
        assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is True
    async with replica_router.writer_session() as db:
        assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is False


async def test_committed_write_reaches_every_replica(
    replica_router: ReplicaRouter, replica_cluster: LocalCluster, table: str
) -> None:
    async with replica_router.writer_session() as db:
        await db.execute(text("INSERT INTO items (k) VALUES ('replicated')"))
    replica_cluster.wait_for_replay()
    for replica in replica_router.replicas:
        async with replica.sessionmaker() as db:
            found = await db.execute(text("SELECT count(*) FROM items WHERE k = 'replicated'"))
            assert found.scalar_one() == 1, replica.name


@BOTH_DRIVERS
async def test_failed_commit_is_an_error_response_not_200(
    replica_router: ReplicaRouter, table: str
) -> None:
    # Protects the function-scoped writer in replica_router/fastapi.py
    # (Depends(writer_scope, scope="function")): the COMMIT happens before the
    # response is sent, so its failure becomes the response.
    app = items_app(replica_router)
    async with client(app) as http:
        assert (await http.post("/items/dup")).status_code == 200
        second = await http.post("/items/dup")
    assert second.status_code == 500
    assert await count(replica_router, "k = 'dup'") == 1


async def test_the_tutorial_yield_dependency_reports_200_for_a_failed_commit(
    replica_router: ReplicaRouter, table: str
) -> None:
    # The same check against the get_db every tutorial shows: proof that the test
    # above can fail. The commit runs after the response was sent.
    sessions = async_sessionmaker(replica_router.primary.engine, expire_on_commit=False)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with sessions() as db:
            yield db
            await db.commit()

    app = FastAPI()

    @app.post("/items/{k}")
    async def create(k: str, db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, str]:
        await db.execute(text("INSERT INTO items (k) VALUES (:k)"), {"k": k})
        return {"k": k}

    async with client(app) as http:
        assert (await http.post("/items/twice")).status_code == 200
        second = await http.post("/items/twice")
    assert second.status_code == 200  # the client was told it worked ...
    assert await count(replica_router, "k = 'twice'") == 1  # ... but nothing was written


@BOTH_DRIVERS
@pytest.mark.parametrize(
    ("path", "status"),
    [("refuse", 409), ("crash", 500), ("bad-response", 500)],
)
async def test_an_endpoint_error_rolls_back(
    replica_router: ReplicaRouter, table: str, path: str, status: int
) -> None:
    # Protects writer_session's rule that only a block that ends without error commits.
    app = items_app(replica_router)
    async with client(app) as http:
        response = await http.post(f"/items/x-{path}/{path}")
    assert response.status_code == status
    assert await count(replica_router, f"k = 'x-{path}'") == 0


async def test_session_used_after_its_request_fails_loudly(
    replica_router: ReplicaRouter, table: str
) -> None:
    # Protects close_resets_only=False in _nodes.build_node: without it the
    # closed session silently reconnects and holds a transaction open forever.
    errors: list[BaseException] = []
    app = FastAPI()

    async def late_use(db: AsyncSession) -> None:
        try:
            await db.execute(text("SELECT 1"))
        except BaseException as exc:
            errors.append(exc)

    @app.post("/late")
    async def late(
        tasks: BackgroundTasks, db: Annotated[AsyncSession, Depends(replica_router.writer)]
    ) -> None:
        tasks.add_task(late_use, db)

    async with client(app) as http:
        assert (await http.post("/late")).status_code == 200
    assert len(errors) == 1
    assert isinstance(errors[0], InvalidRequestError)
    pool = replica_router.primary.engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedout() == 0


async def test_a_streamed_response_reads_through_the_reader(
    replica_router: ReplicaRouter,
) -> None:
    # The reader is released after the response is sent (like get_db), so a stream
    # can still use it; then its connection goes back to the pool.
    app = FastAPI()

    @app.get("/stream")
    async def stream(db: Annotated[AsyncSession, Depends(replica_router.reader)]) -> Response:
        async def rows() -> AsyncIterator[bytes]:
            for n in range(3):
                value = (await db.execute(text("SELECT :n + 1"), {"n": n})).scalar_one()
                yield f"{value}\n".encode()

        return StreamingResponse(rows())

    async with client(app) as http:
        response = await http.get("/stream")
    assert response.status_code == 200
    assert response.text == "1\n2\n3\n"
    for node in replica_router.replicas:
        pool = node.engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedout() == 0
    assert sum(node.state.in_flight for node in replica_router.nodes) == 0


@BOTH_DRIVERS
async def test_write_through_a_reader_fails(replica_router: ReplicaRouter, table: str) -> None:
    app = items_app(replica_router)
    async with client(app) as http:
        assert (await http.post("/write-through-reader/nope")).status_code == 500
    with pytest.raises(DBAPIError) as caught:
        async with replica_router.reader_session() as db:
            await db.execute(text("INSERT INTO items (k) VALUES ('nope')"))
    assert getattr(caught.value.orig, "sqlstate", None) == "25006"


@BOTH_DRIVERS
async def test_write_through_a_reader_fails_on_the_primary_too(
    replica_cluster: LocalCluster, table: str
) -> None:
    # Protects the read-only view of the primary's engine (reader_sessionmaker in
    # _nodes.build_node): with no replicas, reads use the primary.
    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as router:
        async with router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is False
        with pytest.raises(DBAPIError) as caught:
            async with router.reader_session() as db:
                await db.execute(text("INSERT INTO items (k) VALUES ('nope')"))
        assert getattr(caught.value.orig, "sqlstate", None) == "25006"
        assert await count(router, "k = 'nope'") == 0


async def test_reads_are_spread_over_the_replicas(replica_router: ReplicaRouter) -> None:
    app = items_app(replica_router)
    async with client(app) as http:
        ports = Counter([(await http.get("/where")).json()["port"] for _ in range(10)])
    assert sorted(ports.values()) == [5, 5], ports  # round robin over two replicas


async def test_without_replicas_reads_use_the_primary(replica_cluster: LocalCluster) -> None:
    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as router:
        app = items_app(router)
        async with client(app) as http:
            assert (await http.get("/where")).json()["in_recovery"] is False


@BOTH_DRIVERS
async def test_a_dead_replica_is_skipped_before_the_endpoint_runs(
    replica_cluster: LocalCluster,
) -> None:
    # Probes off (a long interval): only the checkout's eager BEGIN can notice.
    settings = RouterSettings.defaults(health_interval=3600)
    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    ) as router:
        app = items_app(router)
        async with client(app) as http:
            for _ in range(4):  # pool connections to both replicas
                assert (await http.get("/where")).status_code == 200
            replica_cluster.kill_node("replica-1")
            statuses = [(await http.get("/where")).status_code for _ in range(6)]
        assert statuses == [200] * 6
        assert not router.status().node("replica-1").healthy


@BOTH_DRIVERS
async def test_sessions_are_handed_out_with_their_transaction_begun(
    replica_router: ReplicaRouter,
) -> None:
    # The eager BEGIN is what proves a pooled connection at no extra round trip: the
    # transaction is open on the server before any of the user's statements.
    for opened in (replica_router.reader_session(), replica_router.writer_session()):
        async with opened as db:
            raw = (await (await db.connection()).get_raw_connection()).driver_connection
            assert raw is not None
            if replica_router.primary.driver.name == "psycopg":
                assert raw.info.transaction_status == 2  # psycopg's INTRANS
            else:
                assert raw.is_in_transaction()


async def test_drivers_can_be_mixed(replica_cluster: LocalCluster, table: str) -> None:
    # Each node has its own driver: an asyncpg primary with psycopg replicas works.
    psycopg = pytest.importorskip("psycopg")
    assert psycopg
    replicas = [u.replace("+asyncpg", "+psycopg") for u in replica_cluster.replica_urls]
    async with ReplicaRouter(replica_cluster.primary_url, replicas, settings=FAST) as router:
        assert [n.driver.name for n in router.nodes] == ["asyncpg", "psycopg", "psycopg"]
        async with router.writer_session() as db:
            await db.execute(text("INSERT INTO items (k) VALUES ('mixed')"))
        async with router.reader_session() as db:  # waits for the write's position
            found = await db.execute(text("SELECT pg_is_in_recovery(), count(*) FROM items"))
            assert found.one() == (True, 1)


@BOTH_DRIVERS
async def test_the_writer_reconnects_after_a_primary_restart(
    replica_cluster: LocalCluster, table: str
) -> None:
    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as router:
        app = items_app(router)
        async with client(app) as http:
            assert (await http.post("/items/before")).status_code == 200
            replica_cluster.restart_node("primary")
            # The pooled connection is dead; the checkout notices and reconnects.
            assert (await http.post("/items/after")).status_code == 200
        assert await count(router, "k IN ('before', 'after')") == 2


async def test_without_the_eager_begin_a_restart_fails_inside_the_endpoint(
    replica_cluster: LocalCluster, table: str
) -> None:
    # The same restart with a plain session: proof the test above can fail.
    engine = create_async_engine(replica_cluster.primary_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
        replica_cluster.restart_node("primary")
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


async def test_close_is_bounded_when_a_server_hangs(replica_cluster: LocalCluster) -> None:
    settings = RouterSettings.defaults(health_interval=3600, dispose_timeout=1.0)
    router = ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    )
    await router.start()
    for _ in range(2):
        async with router.reader_session() as db:
            await db.execute(text("SELECT 1"))
    node = replica_cluster.node("replica-1")
    pids = _process_tree(node.pid)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        await router.close()
        assert time.monotonic() - started < 4.0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _process_tree(pid: int | None) -> list[int]:
    assert pid is not None
    found = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


async def test_status_and_health_routes_mask_passwords(
    replica_router: ReplicaRouter, replica_cluster: LocalCluster
) -> None:
    password = replica_router.primary.url.password
    assert password
    app = FastAPI()
    app.include_router(replica_router.health_routes())
    async with client(app) as http:
        live = await http.get("/health/live")
        nodes = await http.get("/health/nodes")
    assert live.status_code == 200
    assert nodes.status_code == 200
    assert [n["name"] for n in nodes.json()["nodes"]] == ["primary", "replica-1", "replica-2"]
    for shown in (live.text, nodes.text, repr(replica_router), str(replica_router.status())):
        assert str(password) not in shown
    await asyncio.sleep(0)
