"""The README's Integrations and Testing sections, run as they stand there, on real servers.

Each ``<!-- snippet: NAME -->`` block of README.md is read here and executed (Python),
run in a subprocess (the testing files, the workers' command), or read as the
environment it shows (with its hosts replaced by the test cluster's).
"""

import asyncio
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url

from replica_router import ReplicaRouter
from replica_router.testing import LocalCluster, PgBouncer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def snippet(name: str) -> str:
    """The fenced block that follows ``<!-- snippet: name -->`` in the README."""
    _, found, rest = README.read_text().partition(f"<!-- snippet: {name} -->\n```")
    assert found, f"no snippet {name!r} in the README"
    body = rest.split("\n", 1)[1]  # after the language tag
    return body.split("\n```\n", 1)[0] + "\n"


def environment(block: str) -> dict[str, str]:
    """``NAME=value`` lines of a shell snippet (quotes removed, comments skipped)."""
    found = {}
    for line in block.splitlines():
        line = line.removeprefix("export ").strip()
        match = re.fullmatch(r"(REPLICA_ROUTER_[A-Z_]+)=(.*)", line)
        if match:
            (value,) = shlex.split(match.group(2), comments=True) or [""]
            found[match.group(1)] = value
    return found


def run_snippet(name: str, **given: Any) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"readme_{name}", **given}
    exec(compile(snippet(name), f"README.md <{name}>", "exec"), namespace)
    return namespace


@pytest.fixture
def cluster_env(
    replica_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> LocalCluster:
    """Only the cluster's URLs in the REPLICA_ROUTER_* variables; no .env file."""
    for name in list(os.environ):
        if name.startswith("REPLICA_ROUTER_") and name not in (
            "REPLICA_ROUTER_PG_BIN",
            "REPLICA_ROUTER_PG_USER",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", replica_cluster.primary_url)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", ",".join(replica_cluster.replica_urls))
    monkeypatch.setenv("REPLICA_ROUTER_HEALTH_INTERVAL", "0.2")
    return replica_cluster


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


def with_cluster_hosts(url: str, cluster: LocalCluster, hosts: dict[str, str]) -> str:
    """A README URL with the cluster's credentials and ``host:port`` for each named host."""
    url = url.replace("app:secret@", f"postgres:{cluster.password}@")
    for name, node in hosts.items():
        url = re.sub(rf"\b{re.escape(name)}:\d+", f"127.0.0.1:{cluster.node(node).port}", url)
    return url


# -- your own lifespan -----------------------------------------------------------------


async def test_the_router_lifespan_inside_your_own(cluster_env: LocalCluster) -> None:
    found = run_snippet("lifespan")
    app, router = found["app"], found["router"]
    async with started(app):
        status = router.status()
        assert status.started and status.health_checks_running
        assert status.read_your_writes_active  # the middleware is in
        assert app.state.cache == {}
        async with router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is True
    assert not router.status().started


# -- Alembic ---------------------------------------------------------------------------


def test_alembic_migrates_on_the_primary(cluster_env: LocalCluster, tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    cluster_env.execute("primary", "DROP TABLE IF EXISTS alembic_items, alembic_version")
    migrations = tmp_path / "migrations"
    (migrations / "versions").mkdir(parents=True)
    (migrations / "env.py").write_text(snippet("alembic"))
    (migrations / "versions" / "0001_items.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op

            revision = "0001"
            down_revision = None
            branch_labels = None
            depends_on = None


            def upgrade():
                op.create_table("alembic_items", sa.Column("id", sa.Integer, primary_key=True))


            def downgrade():
                op.drop_table("alembic_items")
            """
        )
    )
    package = tmp_path / "app_src" / "myapp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "db.py").write_text(
        textwrap.dedent(
            """
            from sqlalchemy.orm import DeclarativeBase

            from replica_router import ReplicaRouter


            class Base(DeclarativeBase):
                pass


            router = ReplicaRouter.from_env()
            """
        )
    )
    sys.path.insert(0, str(tmp_path / "app_src"))
    config = Config()
    config.set_main_option("script_location", str(migrations))
    try:
        # env.py runs asyncio.run(): in a thread of its own, as `alembic upgrade head`.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(command.upgrade, config, "head").result(timeout=60)
    finally:
        sys.path.remove(str(tmp_path / "app_src"))
        for name in [m for m in sys.modules if m == "myapp" or m.startswith("myapp.")]:
            del sys.modules[name]
    cluster_env.wait_for_replay()
    assert cluster_env.execute("primary", "SELECT version_num FROM alembic_version") == [("0001",)]
    for node in ("primary", "replica-1", "replica-2"):
        found = cluster_env.execute(node, "SELECT to_regclass('alembic_items') IS NOT NULL")
        assert found == [("t",)], node


# -- SQLModel --------------------------------------------------------------------------


async def test_sqlmodel_sessions_on_every_node(cluster_env: LocalCluster) -> None:
    from sqlmodel import SQLModel
    from sqlmodel.ext.asyncio.session import AsyncSession

    cluster_env.execute("primary", "DROP TABLE IF EXISTS hero")
    found = run_snippet("sqlmodel")
    app, router = found["app"], found["router"]
    async with started(app) as http:
        async with router.primary.engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
        created = await http.post("/heroes", json={"name": "Deadpond"})
        assert created.status_code == 201, created.text
        # The position cookie: the read waits for a replica that has the write.
        heroes = await http.get("/heroes")
        async with router.reader_session() as db:
            assert isinstance(db, AsyncSession)
            conn = await db.connection()
            assert (await conn.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is True
    assert heroes.json() == [{"id": created.json()["id"], "name": "Deadpond"}]
    decisions = router.status().reads[0].decisions
    assert decisions["primary_fallback"] == 0 and decisions["primary_behind"] == 0


# -- several workers -------------------------------------------------------------------

WORKERS_APP = """
import os
from typing import Any

from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import ReplicaRouter

# Its own application_name, to count this app's pooled connections on each server.
router = ReplicaRouter.from_env(
    env_file=None,
    engine_options={"connect_args": {"server_settings": {"application_name": "rr-workers"}}},
)
main = FastAPI(lifespan=router.lifespan)


@main.get("/read")
async def read(db: AsyncSession = Depends(router.reader)) -> dict[str, Any]:
    await db.execute(text("SELECT pg_sleep(0.3)"))
    return {"pid": os.getpid()}


@main.post("/write")
async def write(db: AsyncSession = Depends(router.writer)) -> dict[str, Any]:
    await db.execute(text("SELECT pg_sleep(0.3)"))
    return {"pid": os.getpid()}
"""
COUNT_SQL = (
    "SELECT count(*) FILTER (WHERE application_name = 'rr-workers'), "
    "count(*) FILTER (WHERE application_name = 'replica-router-health') FROM pg_stat_activity"
)


@pytest.fixture
def two_workers(cluster_env: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """The README's uvicorn command, with two workers and small pools."""
    lines = [line for line in snippet("workers").splitlines() if line.startswith("uvicorn ")]
    (command,) = lines
    argv = shlex.split(command)
    argv[argv.index("myapp.main:app")] = "workers_app:main"
    argv[argv.index("--workers") + 1] = "2"
    assert "REPLICA_ROUTER_LSN_SECRET" in environment(snippet("workers"))
    (tmp_path / "workers_app.py").write_text(WORKERS_APP)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "REPLICA_ROUTER_LSN_SECRET": "a-secret-for-every-worker-0123456789",
        "REPLICA_ROUTER_POOL_SIZE": "2",
        "REPLICA_ROUTER_MAX_OVERFLOW": "1",
        "REPLICA_ROUTER_HEALTH_INTERVAL": "0.5",
    }
    argv = [sys.executable, "-m", *argv, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        [*argv, "--log-level", "warning"], cwd=tmp_path, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while len(pids) < 2:
            assert process.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, "two workers never answered"
            try:
                with httpx.Client(base_url=url) as http:
                    pids.add(http.post("/write").json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


async def test_connections_per_node_stay_within_the_formula(
    cluster_env: LocalCluster, two_workers: str
) -> None:
    workers, pool_size, max_overflow = 2, 2, 1
    bound = workers * (pool_size + max_overflow) + workers
    peaks: dict[str, tuple[int, int]] = {}

    async def one(method: str, path: str) -> int:
        async with httpx.AsyncClient(base_url=two_workers, timeout=30) as http:
            return (await http.request(method, path)).status_code

    async def sample() -> None:
        for _ in range(8):
            for node in ("primary", "replica-1", "replica-2"):
                row = await asyncio.to_thread(cluster_env.execute, node, COUNT_SQL)
                pooled, probes = int(row[0][0]), int(row[0][1])
                old = peaks.get(node, (0, 0))
                peaks[node] = (max(old[0], pooled), max(old[1], probes))
            await asyncio.sleep(0.1)

    burst = [one("GET", "/read") for _ in range(24)] + [one("POST", "/write") for _ in range(12)]
    statuses, _ = await asyncio.gather(asyncio.gather(*burst), sample())
    assert set(statuses) == {200}
    for node, (pooled, probes) in peaks.items():
        assert 1 <= probes <= workers, (node, peaks)
        assert pooled + probes <= bound, (node, peaks)
    assert peaks["primary"][0] >= 1  # the writes were seen


# -- Patroni and multi-host URLs -------------------------------------------------------


async def test_every_member_in_the_primary_url_and_in_the_replicas(
    cluster_env: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = {"pg-1": "primary", "pg-2": "replica-1", "pg-3": "replica-2"}
    for name, value in environment(snippet("patroni")).items():
        monkeypatch.setenv(name, with_cluster_hosts(value, cluster_env, hosts))
    async with ReplicaRouter.from_env() as router:
        assert [n.name for n in router.replicas] == ["pg-1", "pg-2", "pg-3"]
        for _ in range(6):
            async with router.writer_session() as db:
                row = (
                    await db.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))
                ).one()
                assert row == (False, cluster_env.primary.port)
            async with router.reader_session() as db:
                assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is True
        leader = router.status().node("pg-1")
        assert not leader.healthy and leader.server_role == "primary"
        assert "not in recovery" in (leader.reason or "")
        assert router.status().node("pg-1").sessions == 0  # the leader served no read


# -- RDS and Aurora --------------------------------------------------------------------


async def test_rds_urls_keep_tls_and_name_each_replica(
    cluster_env: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = environment(snippet("rds"))
    for name, value in shown.items():
        monkeypatch.setenv(name, value)
    router = ReplicaRouter.from_env()
    assert [n.name for n in router.replicas] == ["ro-1", "ro-2"]
    for node in router.nodes:
        assert node.url.query == {"ssl": "require"}
        assert node.url.host is not None and node.url.host.endswith(".rds.amazonaws.com")
    await router.close()
    # The same URLs on the local cluster, whose servers have no TLS: ssl=prefer
    # reaches asyncpg (pools and probes) and falls back to plain connections.
    hosts = {
        "mydb.abc123.eu-west-1.rds.amazonaws.com": "primary",
        "mydb-ro-1.abc123.eu-west-1.rds.amazonaws.com": "replica-1",
        "mydb-ro-2.abc123.eu-west-1.rds.amazonaws.com": "replica-2",
    }
    for name, value in shown.items():
        local = with_cluster_hosts(value, cluster_env, hosts).replace("ssl=require", "ssl=prefer")
        monkeypatch.setenv(name, local)
    async with ReplicaRouter.from_env() as local_router:
        async with local_router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is True
        assert all(n.healthy for n in local_router.status().nodes)


# -- PgBouncer -------------------------------------------------------------------------


async def test_pgbouncer_in_transaction_mode(
    cluster_env: LocalCluster, pgbouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = environment(snippet("pgbouncer"))
    assert shown["REPLICA_ROUTER_POOLER"] == "transaction"
    bouncers = {
        "pgbouncer-primary": pgbouncer.primary_url,
        "pgbouncer-replica-1": pgbouncer.replica_urls[0],
        "pgbouncer-replica-2": pgbouncer.replica_urls[1],
    }
    for name, value in shown.items():
        for host, url in bouncers.items():
            through = make_url(url)
            value = re.sub(
                rf"app:secret@{host}:6432/app",
                f"{through.username}:{through.password}@{through.host}:{through.port}/"
                f"{through.database}",
                value,
            )
        monkeypatch.setenv(name, value)
    cluster_env.execute("primary", "DROP TABLE IF EXISTS bounced; CREATE TABLE bounced (n int)")
    async with ReplicaRouter.from_env() as router:
        assert router.primary.url.port == make_url(pgbouncer.primary_url).port
        for n in range(50):  # the same statements again and again, in new transactions
            async with router.writer_session() as db:
                await db.execute(text("INSERT INTO bounced (n) VALUES (:n)"), {"n": n})
            async with router.reader_session() as db:
                await db.execute(text("SELECT count(*) FROM bounced WHERE n <= :n"), {"n": n})
    assert cluster_env.execute("primary", "SELECT count(*) FROM bounced") == [("50",)]


# -- Prometheus ------------------------------------------------------------------------


async def test_prometheus_metrics_are_mounted(cluster_env: LocalCluster) -> None:
    router = ReplicaRouter.from_env()
    app = FastAPI(lifespan=router.lifespan)
    run_snippet("prometheus", app=app, router=router)
    async with started(app) as http:
        async with router.reader_session() as db:
            await db.execute(text("SELECT 1"))
        metrics = (await http.get("/metrics/")).text
    assert 'replica_router_node_healthy{node="replica-1",role="replica"} 1.0' in metrics
    assert 'replica_router_checkout_seconds_bucket{le="+Inf",node="replica-1"' in metrics
    assert cluster_env.password not in metrics


# -- the README's testing section ------------------------------------------------------

MYAPP = """
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import ReplicaRouter

router = ReplicaRouter.from_env()
app = FastAPI(lifespan=router.lifespan)


class NoteIn(BaseModel):
    title: str


@app.post("/notes", status_code=201)
async def create(note: NoteIn, db: Annotated[AsyncSession, Depends(router.writer)]) -> Any:
    row = await db.execute(
        text("INSERT INTO notes (title) VALUES (:title) RETURNING id"), {"title": note.title}
    )
    return {"id": row.scalar_one()}


@app.get("/notes/{note_id}")
async def read(note_id: int, db: Annotated[AsyncSession, Depends(router.reader)]) -> Any:
    found = await db.execute(text("SELECT title FROM notes WHERE id = :id"), {"id": note_id})
    title = found.scalar_one_or_none()
    if title is None:
        raise HTTPException(404)
    return {"id": note_id, "title": title}
"""


def test_the_testing_section_runs_as_pasted(tmp_path: Path) -> None:
    # A user's project: their app, and the README's three files, nothing else.
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "main.py").write_text(MYAPP)
    for name in ("testing-pyproject", "testing-conftest", "testing-test"):
        code = snippet(name)
        filename = code.splitlines()[0].removeprefix("# ").strip()
        (tmp_path / filename).write_text(code)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "conftest.py",
        "myapp",
        "pyproject.toml",
        "test_notes.py",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICA_ROUTER_")}
    for keep in ("REPLICA_ROUTER_PG_BIN", "REPLICA_ROUTER_PG_USER"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    # The app's own configuration, which the tests never reach.
    env["REPLICA_ROUTER_PRIMARY_URL"] = "postgresql://app:pw@127.0.0.1:1/app"
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 passed" in result.stdout
