"""A user's mistakes fail loudly (issue #16), each made as a user makes it, on real servers.

A misspelled variable is in tests/unit/test_settings.py, NullPool in tests/unit/test_pool.py,
and ``replica-router check`` without replicas in test_cli.py.
"""

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urljoin

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from replica_router import (
    ConfigurationError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    ReplicaRouter,
    RouterSettings,
    SessionClosedError,
)
from replica_router.testing import LocalCluster
from replica_router.testing.pytest_plugin import DRIVERS

pytestmark = pytest.mark.integration
BOTH_DRIVERS = pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)

FAST = RouterSettings.defaults(health_interval=0.2, health_timeout=1.0)
NOWHERE = "postgresql://app:pw@127.0.0.1:1/app"  # a production URL a test never reaches


@pytest.fixture
def table(replica_cluster: LocalCluster) -> str:
    replica_cluster.execute(
        "primary",
        "DROP TABLE IF EXISTS mistakes; CREATE TABLE mistakes (id serial PRIMARY KEY, k text)",
    )
    replica_cluster.wait_for_replay()
    return "mistakes"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No REPLICA_ROUTER_* settings from the outside, and no .env file."""
    for name in list(os.environ):
        if name.startswith("REPLICA_ROUTER_") and name not in (
            "REPLICA_ROUTER_PG_BIN",
            "REPLICA_ROUTER_PG_USER",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def client(app: FastAPI, *, raise_app_exceptions: bool = False) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, as TestClient(app) in a ``with`` block does."""
    async with app.router.lifespan_context(app), client(app) as http:
        yield http


def wrong_password(url: str, cluster: LocalCluster) -> str:
    assert cluster.password in url
    return url.replace(cluster.password, "not-the-password")


def records(caplog: pytest.LogCaptureFixture, *words: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("replica_router") and all(w in r.getMessage() for w in words)
    ]


async def count(cluster_url: str, where: str = "true") -> int:
    engine = create_async_engine(cluster_url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(text(f"SELECT count(*) FROM mistakes WHERE {where}"))
            return int(found.scalar_one())
    finally:
        await engine.dispose()


def notes_app(router: ReplicaRouter, lifespan: bool = True) -> FastAPI:
    """The app a user writes: writes, reads, health routes."""
    app = FastAPI(lifespan=router.lifespan if lifespan else None)
    app.include_router(router.health_routes())
    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]

    @app.post("/items/{k}", status_code=201)
    async def create(k: str, db: Writer) -> dict[str, Any]:
        row = await db.execute(text("INSERT INTO mistakes (k) VALUES (:k) RETURNING id"), {"k": k})
        return {"id": row.scalar_one()}

    @app.get("/items/{item_id}")
    async def read(item_id: int, db: Reader) -> dict[str, Any]:
        found = await db.execute(text("SELECT k FROM mistakes WHERE id = :id"), {"id": item_id})
        k = found.scalar_one_or_none()
        if k is None:
            raise HTTPException(404, "no such item")
        return {"k": k}

    @app.get("/where")
    async def where(db: Reader) -> dict[str, Any]:
        row = (await db.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
        return {"replica": row[0], "port": row[1]}

    return app


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the router never noticed"
        await asyncio.sleep(0.05)


# -- item 1: no replicas ---------------------------------------------------------------


async def test_no_replicas_is_said_once_at_start_up(
    replica_cluster: LocalCluster,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="replica_router")
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", replica_cluster.primary_url)
    router = ReplicaRouter.from_env()  # REPLICA_ROUTER_REPLICA_URLS forgotten
    async with router:
        await router.start()  # a second start says nothing again
        async with router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is False
    (said,) = records(caplog, "no replicas")
    assert said.levelno == logging.WARNING
    assert "REPLICA_ROUTER_REPLICA_URLS is not set, so every read goes to the primary" in (
        said.getMessage()
    )
    assert any("REPLICA_ROUTER_REPLICA_URLS" in w for w in router.status().warnings)

    # Set, and empty: what the user asked for, said at INFO.
    caplog.clear()
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", "")
    async with ReplicaRouter.from_env() as asked:
        (said,) = records(caplog, "no replicas")
        assert said.levelno == logging.INFO
        assert said.getMessage().endswith("no replicas configured: every read goes to the primary")
        assert "REPLICA_ROUTER_REPLICA_URLS" not in " ".join(asked.status().warnings)


# -- item 2: a forgotten lifespan ------------------------------------------------------


async def test_a_forgotten_lifespan_warns_once_and_the_status_tells_the_truth(
    replica_cluster: LocalCluster, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    app = notes_app(router, lifespan=False)  # FastAPI() without lifespan=router.lifespan
    try:
        async with client(app) as http:
            created = await http.post("/items/a")
            assert created.status_code == 201
            await http.post("/items/b")
            await http.get("/where")
            nodes = (await http.get("/health/nodes")).json()
            ready = (await http.get("/health/ready")).json()
    finally:
        await router.close()
    (warning,) = records(caplog, "never started")
    assert warning.levelno == logging.WARNING
    assert "lifespan=router.lifespan" in warning.getMessage()
    assert "rr_lsn" not in created.headers.get("set-cookie", "")
    assert nodes["started"] is False
    assert nodes["health_checks_running"] is False
    assert nodes["read_your_writes"] == "lsn"
    assert nodes["read_your_writes_active"] is False
    assert any("lifespan=router.lifespan" in w for w in nodes["warnings"])
    assert any("lifespan=router.lifespan" in w for w in ready["warnings"])


async def test_with_the_lifespan_the_same_app_is_whole(
    replica_cluster: LocalCluster, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    async with started(notes_app(router)) as http:
        created = await http.post("/items/a")
        assert created.cookies.get("rr_lsn")
        nodes = (await http.get("/health/nodes")).json()
    assert nodes["started"] is True
    assert nodes["health_checks_running"] is True
    assert nodes["read_your_writes_active"] is True
    assert nodes["warnings"] == []
    assert records(caplog, "never started") == []


# -- item 3: overriding the dependencies in a user's tests -----------------------------


async def test_an_old_style_get_db_override_of_the_writer_is_loud(
    replica_cluster: LocalCluster, table: str
) -> None:
    # The override a user had for get_db, pasted onto router.writer. Routes no longer
    # call commit(): the POST says 201 and the row is gone.
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    app = notes_app(router)
    engine = create_async_engine(replica_cluster.primary_url)
    TestingSessionLocal = async_sessionmaker(engine, expire_on_commit=False)

    async def override_get_db() -> AsyncIterator[AsyncSession]:
        async with TestingSessionLocal() as session:
            yield session

    app.dependency_overrides[router.writer] = override_get_db
    app.dependency_overrides[router.reader] = override_get_db
    try:
        async with started(app) as http:
            with pytest.warns(UserWarning, match=r"no longer call commit\(\)") as warned:
                created = await http.post("/items/lost")
            assert created.status_code == 201
            missing = await http.get(f"/items/{created.json()['id']}")  # warned once only
            assert missing.status_code == 404  # the silent data loss the warning is about
            (message,) = {str(w.message) for w in warned}
            assert "override_get_db" in message
            assert "routes no longer call commit()" in message
            assert "router.override_for_tests(app, test_router)" in message
    finally:
        await engine.dispose()
    assert await count(replica_cluster.primary_url, "k = 'lost'") == 0


async def test_override_for_tests_points_the_app_at_a_test_database(
    replica_cluster: LocalCluster, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The app as shipped (its router configured for production), and a router over
    # the test database; httpx.ASGITransport runs no lifespan.
    router = ReplicaRouter(NOWHERE, ["postgresql://app:pw@127.0.0.1:2/app"])
    relaxed = router.reader_with(read_your_writes="off", max_lag_seconds=60)
    app = notes_app(router, lifespan=True)

    @app.get("/relaxed")
    async def relaxed_read(db: Annotated[AsyncSession, Depends(relaxed)]) -> dict[str, int]:
        return {"port": (await db.execute(text("SELECT inet_server_port()"))).scalar_one()}

    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as test_router:
        router.override_for_tests(app, test_router)
        async with client(app) as http:
            created = await http.post("/items/kept")
            assert created.status_code == 201
            assert created.cookies.get("rr_lsn")  # the middleware is in place
            read = await http.get(f"/items/{created.json()['id']}")
            assert read.status_code == 200, read.text
            assert (await http.get("/relaxed")).status_code == 200
        app.dependency_overrides.clear()
    assert await count(replica_cluster.primary_url, "k = 'kept'") == 1
    assert records(caplog, "never started") == []


# -- item 4: readiness and liveness ----------------------------------------------------


async def test_with_the_primary_down_pods_stay_ready_and_serve_reads(
    replica_cluster: LocalCluster, table: str
) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    async with started(notes_app(router)) as http:
        created = await http.post("/items/before")
        replica_cluster.wait_for_replay()
        replica_cluster.stop_node("primary", mode="immediate")
        await wait_for(lambda: not router.status().primary.healthy)
        ready = await http.get("/health/ready")
        live = await http.get("/health/live")
        read = await http.get(f"/items/{created.json()['id']}")
        write = await http.post("/items/during")
    assert live.status_code == 200
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "degraded"
    assert body["reads"] is True and body["writes"] is False
    assert body["reads_from"] == ["replica-1", "replica-2"]
    assert read.status_code == 200
    assert write.status_code == 503


async def test_ready_says_when_no_node_can_read(replica_cluster: LocalCluster) -> None:
    settings = RouterSettings.defaults(
        health_interval=0.2, health_timeout=1.0, fallback_to_primary=False, checkout_attempts=1
    )
    router = ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    )
    async with started(notes_app(router)) as http:
        for name in ("replica-1", "replica-2"):
            replica_cluster.stop_node(name, mode="immediate")
        await wait_for(lambda: not any(n.healthy for n in router.status().nodes[1:]))
        only_writes = await http.get("/health/ready")
        read = await http.get("/where")
        replica_cluster.stop_node("primary", mode="immediate")
        await wait_for(lambda: not router.status().primary.healthy)
        nothing = await http.get("/health/ready")
        live = await http.get("/health/live")
    assert read.status_code == 503  # every read, with the fallback off
    assert only_writes.status_code == 200
    assert only_writes.json() | {"warnings": []} == {
        "status": "degraded",
        "reads": False,
        "writes": True,
        "reads_from": [],
        "health_checks_running": True,
        "warnings": [],
    }
    assert nothing.status_code == 503
    assert nothing.json()["status"] == "unavailable"
    assert live.status_code == 200  # nothing a restart would cure


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "body":
            self.body = dict(attrs)


async def test_the_status_page_renders_the_nodes_route(replica_cluster: LocalCluster) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls)
    app = notes_app(router, lifespan=False)
    async with client(app) as http:
        page = await http.get("/health/ui")
        parser = Page()
        parser.feed(page.text)
        source = parser.body["data-source"]
        assert source is not None
        data = await http.get(urljoin(str(page.url), source))
        nodes = await http.get("/health/nodes")
    await router.close()
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert {"html", "head", "body", "script", "table"} <= set(parser.tags)
    assert data.url.path == "/health/nodes"
    assert data.json() == nodes.json()
    assert replica_cluster.password not in page.text + data.text
    assert [n["name"] for n in data.json()["nodes"]] == ["primary", "replica-1", "replica-2"]


# -- item 6: a wrong password ----------------------------------------------------------


@BOTH_DRIVERS
async def test_a_wrong_password_is_a_503_and_one_log_line(
    replica_cluster: LocalCluster, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = wrong_password(replica_cluster.primary_url, replica_cluster)
    router = ReplicaRouter(url, settings=FAST)
    async with started(notes_app(router)) as http:
        responses = [await http.post(f"/items/x{n}") for n in range(3)]
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == (
            "the primary refused the connection: password authentication failed (28P01); "
            "check the user, password and database in its URL"
        )
    said = records(caplog, "primary", "password authentication failed")
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].exc_info is None  # no traceback
    assert replica_cluster.password not in caplog.text
    assert "not-the-password" not in caplog.text
    assert router.status().primary.reason is not None


@BOTH_DRIVERS
async def test_a_replica_with_a_wrong_password_is_skipped_with_one_log_line(
    replica_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    replicas = [
        wrong_password(replica_cluster.replica_urls[0], replica_cluster),
        replica_cluster.replica_urls[1],
    ]
    # Not started, so no probe: the first request finds out, and says it once.
    router = ReplicaRouter(replica_cluster.primary_url, replicas, settings=FAST)
    try:
        app = notes_app(router, lifespan=False)
        async with client(app) as http:
            answers = [await http.get("/where") for _ in range(6)]
            await asyncio.sleep(0.3)  # past one health interval: it is tried again
            answers += [await http.get("/where") for _ in range(4)]
    finally:
        await router.close()
    assert [a.status_code for a in answers] == [200] * 10
    port = replica_cluster.node("replica-2").port
    assert {a.json()["port"] for a in answers} == {port}
    said = records(caplog, "replica-1", "password authentication failed")
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].exc_info is None
    assert said[0].getMessage() == (
        "replica replica-1 refused the connection: password authentication failed for user "
        '"postgres" (28P01); check the user, password and database in its URL'
    )
    status = router.status().node("replica-1")
    assert not status.healthy
    assert status.reason == "refused: password authentication failed (28P01)"


@pytest.mark.parametrize(
    ("break_url", "expected", "words"),
    [
        ("password", ConfigurationError, "password authentication failed"),
        ("database", ConfigurationError, "does not exist (3D000)"),
        ("port", PrimaryUnavailableError, "primary primary cannot be reached"),
    ],
)
async def test_require_at_start_fails_the_start_up(
    replica_cluster: LocalCluster,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    break_url: str,
    expected: type[Exception],
    words: str,
) -> None:
    url = replica_cluster.primary_url
    if break_url == "password":
        url = wrong_password(url, replica_cluster)
    elif break_url == "database":
        url = url.rsplit("/", 1)[0] + "/no_such_database"
    else:
        url = url.replace(f":{replica_cluster.primary.port}/", ":1/")
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", url)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", ",".join(replica_cluster.replica_urls))
    monkeypatch.setenv("REPLICA_ROUTER_REQUIRE_AT_START", "primary")
    monkeypatch.setenv("REPLICA_ROUTER_CONNECT_TIMEOUT", "1")
    router = ReplicaRouter.from_env()
    with pytest.raises(expected) as caught:
        async with started(notes_app(router)):
            pass
    message = str(caught.value)
    assert message.startswith("the router cannot start (REPLICA_ROUTER_REQUIRE_AT_START=primary)")
    assert words in message
    assert replica_cluster.password not in message
    assert not router.status().started
    assert not router.status().health_checks_running


async def test_require_at_start_all_names_every_node_it_could_not_reach(
    replica_cluster: LocalCluster,
) -> None:
    replica_cluster.stop_node("replica-2")
    settings = RouterSettings.defaults(require_at_start="all", connect_timeout=1.0)
    router = ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    )
    with pytest.raises(NoHealthyReplicaError, match="replica replica-2 cannot be reached"):
        await router.start()
    # The primary alone is fine, and a good configuration starts.
    relaxed = RouterSettings.defaults(require_at_start="primary", connect_timeout=1.0)
    async with ReplicaRouter(replica_cluster.primary_url, settings=relaxed) as ok:
        assert ok.status().started


# -- item 7: a session used after its request ------------------------------------------


async def test_a_background_task_on_the_writer_session_says_what_to_use(
    replica_cluster: LocalCluster, table: str
) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    app = notes_app(router)
    errors: list[BaseException] = []

    async def audit(db: AsyncSession) -> None:
        try:
            await db.execute(text("INSERT INTO mistakes (k) VALUES ('audit')"))
        except BaseException as exc:
            errors.append(exc)

    @app.post("/with-audit", status_code=201)
    async def with_audit(
        tasks: BackgroundTasks, db: Annotated[AsyncSession, Depends(router.writer)]
    ) -> None:
        await db.execute(text("INSERT INTO mistakes (k) VALUES ('main')"))
        tasks.add_task(audit, db)

    async with started(app) as http:
        assert (await http.post("/with-audit")).status_code == 201
    (error,) = errors
    assert isinstance(error, SessionClosedError)
    assert isinstance(error, InvalidRequestError)
    assert "async with router.writer_session() as db" in str(error)
    assert "BackgroundTasks" in str(error)
    assert await count(replica_cluster.primary_url, "k = 'main'") == 1
    assert await count(replica_cluster.primary_url, "k = 'audit'") == 0


async def test_a_streaming_write_is_a_500_not_an_empty_200(
    replica_cluster: LocalCluster, table: str
) -> None:
    router = ReplicaRouter(replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST)
    app = notes_app(router)
    Writer = Annotated[AsyncSession, Depends(router.writer)]

    @app.post("/export")
    async def export(db: Writer) -> Response:
        async def rows() -> AsyncIterator[bytes]:
            await db.execute(text("INSERT INTO mistakes (k) VALUES ('streamed')"))
            yield b"done\n"

        return StreamingResponse(rows())

    @app.post("/export-after-write")
    async def export_after_write(db: Writer) -> Response:
        await db.execute(text("INSERT INTO mistakes (k) VALUES ('before-stream')"))

        async def rows() -> AsyncIterator[bytes]:
            for n in range(3):
                yield f"{n}\n".encode()

        return StreamingResponse(rows())

    @app.post("/export-own-session")
    async def export_own_session() -> Response:
        async def rows() -> AsyncIterator[bytes]:
            async with router.writer_session() as db:
                await db.execute(text("INSERT INTO mistakes (k) VALUES ('own')"))
            yield b"done\n"

        return StreamingResponse(rows())

    async with started(app) as http:
        failed = await http.post("/export")
        fine = await http.post("/export-after-write")
        own = await http.post("/export-own-session")
    assert failed.status_code == 500
    assert failed.text == "Internal Server Error"
    assert await count(replica_cluster.primary_url, "k = 'streamed'") == 0
    # A stream that does not use the closed writer streams as before.
    assert fine.status_code == 200 and fine.text == "0\n1\n2\n"
    assert own.status_code == 200 and own.text == "done\n"
    assert await count(replica_cluster.primary_url, "k IN ('before-stream', 'own')") == 2

    # What the server logs for the 500 says what to use instead.
    async with app.router.lifespan_context(app), client(app, raise_app_exceptions=True) as http:
        with pytest.raises(SessionClosedError, match=r"router\.writer_session\(\)"):
            await http.post("/export")


async def test_the_writer_session_of_a_sqlmodel_style_class_is_guarded_too(
    replica_cluster: LocalCluster,
) -> None:
    # The user's session class_ is kept; only the closed instance refuses.
    class MySession(AsyncSession):
        pass

    router = ReplicaRouter(
        replica_cluster.primary_url, settings=FAST, session_options={"class_": MySession}
    )
    kept: list[AsyncSession] = []
    app = FastAPI(lifespan=router.lifespan)

    @app.post("/keep")
    async def keep(db: Annotated[AsyncSession, Depends(router.writer)]) -> None:
        kept.append(db)

    async with started(app) as http:
        assert (await http.post("/keep")).status_code == 200
    (db,) = kept
    assert type(db) is MySession
    with pytest.raises(SessionClosedError, match=r"router\.writer_session"):
        await db.execute(text("SELECT 1"))
