"""PgBouncer in transaction pooling mode in front of the cluster's servers.

What these tests pin down, for the pooler support to build on:

* each fronted server has its own address, and a client reaches that server;
* transaction pooling: one client's transactions run on different server
  connections, and session state (``SET``) stays with the server connection;
* prepared statements do not survive it. SQLAlchemy's asyncpg dialect with its
  defaults fails under concurrent use, and so does the recipe with
  ``prepared_statement_name_func``, as long as SQLAlchemy's own prepared
  statement cache keeps the named statements from one transaction to the next.
  ``statement_cache_size=0`` alone works: asyncpg then uses the unnamed
  statement and parses it again at every execution. psycopg fails with its
  default ``prepare_threshold`` and works with ``prepare_threshold=None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from sqlalchemy import String, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from replica_router.testing import LocalCluster, PgBouncer, PgBouncerNotFoundError
from replica_router.testing import _pgbouncer_binary as pgbouncer_module
from replica_router.testing._binaries import server_user
from replica_router.testing._watchdog import processes_under
from replica_router.testing.containers import DockerCluster

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE = "pgbouncer_items"
ROWS = 100
# Concurrent tasks and transactions per task of the load; 4 statements each:
# 800 statements in all.
TASKS = 8
TRANSACTIONS = 25
# Rounds (a fresh engine each) a failing configuration gets to show its error.
ROUNDS = 3


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    qty: Mapped[int]


def unique_name() -> str:
    return f"__asyncpg_{uuid4()}__"


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def items(replica_router_cluster: LocalCluster | DockerCluster) -> Iterator[str]:
    """A table of ``ROWS`` items on the primary, dropped afterwards."""
    cluster = replica_router_cluster
    cluster.execute(
        "primary",
        f"DROP TABLE IF EXISTS {TABLE}; "
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name varchar(50) NOT NULL, qty int NOT NULL); "
        f"INSERT INTO {TABLE} SELECT g, 'n' || g, g FROM generate_series(1, {ROWS}) g",
    )
    yield TABLE
    with contextlib.suppress(Exception):
        cluster.execute("primary", f"DROP TABLE IF EXISTS {TABLE}")


@pytest.fixture
def bouncer(
    pgbouncer: PgBouncer, replica_cluster: LocalCluster | DockerCluster, items: str
) -> PgBouncer:
    """The session's PgBouncer, over a cluster healed of faults left by earlier tests."""
    return pgbouncer


@pytest.fixture
def local_cluster(replica_cluster: LocalCluster | DockerCluster) -> LocalCluster:
    if not isinstance(replica_cluster, LocalCluster):
        pytest.skip("PgBouncer fronts a LocalCluster only")
    try:
        pgbouncer_module.find_pgbouncer()
    except PgBouncerNotFoundError as exc:
        pytest.skip(str(exc))
    return replica_cluster


@contextlib.asynccontextmanager
async def holding(bouncer: PgBouncer, node: str, backend_pid: int) -> AsyncIterator[Any]:
    """Hold the server connection of backend ``backend_pid`` in an open transaction.

    Each new client's transaction takes an idle server connection if there is one,
    so opening transactions (and keeping them open) until one lands on that backend
    takes at most as many clients as the pool has server connections.
    """
    dsn = bouncer.dsn(node)
    clients: list[Any] = []
    try:
        for _ in range(int(bouncer.settings["default_pool_size"]) + 1):
            client = await asyncpg.connect(dsn, statement_cache_size=0)
            clients.append(client)
            await client.execute("BEGIN")
            if await client.fetchval("SELECT pg_backend_pid()") == backend_pid:
                yield client
                return
        pytest.fail(f"no transaction landed on backend {backend_pid}")
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.execute("COMMIT")
            await client.close()


@dataclass
class Load:
    """What a load run saw: statements that succeeded, errors by SQLSTATE, wrong rows."""

    statements: int = 0
    wrong: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    first_error_after: int | None = None

    def record(self, exc: Exception) -> None:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        self.errors[str(getattr(orig, "sqlstate", None) or type(orig).__name__)] += 1
        self.messages.append(str(orig).splitlines()[0] if str(orig) else repr(orig))
        if self.first_error_after is None:
            self.first_error_after = self.statements

    def prepared_statement_errors(self) -> list[str]:
        return [m for m in self.messages if "prepared statement" in m]


async def run_load(
    url: str,
    connect_args: dict[str, Any] | None = None,
    *,
    isolation_level: str | None = None,
    stop_at_first_error: bool = False,
) -> Load:
    """``TASKS`` concurrent tasks, each ``TRANSACTIONS`` ORM units of 4 statements."""
    options: dict[str, Any] = {"pool_size": TASKS, "max_overflow": 0}
    if isolation_level is not None:
        options["isolation_level"] = isolation_level
    engine = create_async_engine(url, connect_args=connect_args or {}, **options)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    load = Load()

    async def task(number: int) -> None:
        for unit in range(TRANSACTIONS):
            if stop_at_first_error and load.errors:
                return
            key = (number * 7 + unit) % ROWS + 1
            try:
                async with sessions() as session:
                    item = await session.get(Item, key)
                    load.statements += 1
                    query = select(func.count()).select_from(Item).where(Item.qty > key)
                    await session.execute(query)
                    load.statements += 1
                    by_name = select(Item).where(Item.name == f"n{key}")
                    found = (await session.scalars(by_name)).all()
                    load.statements += 1
                    if item is None or item.id != key or [row.id for row in found] != [key]:
                        load.wrong += 1
                        continue
                    item.qty += 1
                    await session.commit()
                    load.statements += 1
            except Exception as exc:  # every failure counts; the tests look at which
                load.record(exc)

    try:
        await asyncio.gather(*(task(n) for n in range(TASKS)))
    finally:
        await engine.dispose()
    return load


async def load_until_error(url: str, connect_args: dict[str, Any] | None = None, **kw: Any) -> Load:
    """Run the load up to ``ROUNDS`` times, until a round sees an error."""
    load = Load()
    for _ in range(ROUNDS):
        load = await run_load(url, connect_args, stop_at_first_error=True, **kw)
        if load.errors:
            break
    return load


def psycopg_url(url: str) -> str:
    pytest.importorskip("psycopg")
    return url.replace("postgresql+asyncpg://", "postgresql+psycopg://", 1)


def bouncer_processes(base: Path) -> dict[int, tuple[int, str]]:
    """Live processes whose command line names ``base``: pid -> (uid, command line)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        if str(base) in cmdline and "pgbouncer" in cmdline and "_watchdog" not in cmdline:
            uid = next(int(line.split()[1]) for line in status.splitlines() if line[:4] == "Uid:")
            found[int(entry)] = (uid, cmdline.strip())
    return found


# -- addresses, configuration, admin console -------------------------------------------------


async def test_each_address_reaches_its_server(bouncer: PgBouncer) -> None:
    cluster = bouncer.cluster
    assert bouncer.nodes == [node.name for node in cluster.nodes]
    assert bouncer.primary_url == bouncer.url("primary")
    assert bouncer.replica_urls == [bouncer.url(node) for node in cluster.replicas]
    ports = {bouncer.port(node) for node in cluster.nodes}
    assert len(ports) == len(cluster.nodes)
    assert not ports & {node.port for node in cluster.nodes}
    for node in cluster.nodes:
        assert bouncer.url(node).startswith("postgresql+asyncpg://")
        assert f"@127.0.0.1:{bouncer.port(node)}/" in bouncer.dsn(node)
        conn = await asyncpg.connect(bouncer.dsn(node), statement_cache_size=0)
        try:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS replica, inet_server_port() AS port, "
                "current_database() AS db"
            )
        finally:
            await conn.close()
        assert row["replica"] is (node.role == "replica"), node.name
        assert row["port"] == node.port
        assert row["db"] == cluster.database


def test_configuration(bouncer: PgBouncer) -> None:
    config = {row[0]: row[1] for row in bouncer.admin("SHOW CONFIG", node="primary")}
    assert config["pool_mode"] == "transaction"
    assert config["max_client_conn"] == "200"
    assert config["default_pool_size"] == "20"
    assert config["auth_type"] == "scram-sha-256"
    assert config["listen_addr"] == "127.0.0.1"
    assert config["server_reset_query"] == ""
    assert set(config["ignore_startup_parameters"].split(",")) >= {"extra_float_digits", "options"}
    assert bouncer.version is not None and bouncer.version.count(".") == 2


async def test_admin_console_shows_clients_and_pools(bouncer: PgBouncer) -> None:
    conn = await asyncpg.connect(bouncer.dsn("replica-1"), statement_cache_size=0)
    try:
        await conn.fetchval("SELECT 1")
        clients = bouncer.admin("SHOW CLIENTS", node="replica-1")
        pools = bouncer.admin("SHOW POOLS", node="replica-1")
    finally:
        await conn.close()
    user, database = bouncer.cluster.user, bouncer.cluster.database
    assert any(row[1] == user and row[2] == database for row in clients), clients
    assert any(row[0] == database and "transaction" in row for row in pools), pools
    with pytest.raises(ValueError, match="name the node"):
        bouncer.admin("SHOW POOLS")


async def test_startup_parameters_drivers_send_are_accepted(bouncer: PgBouncer) -> None:
    # pgJDBC and psycopg2 send extra_float_digits; PgBouncer drops it instead of refusing.
    conn = await asyncpg.connect(
        bouncer.dsn("primary"),
        statement_cache_size=0,
        server_settings={"extra_float_digits": "3", "application_name": "pgbouncer-test"},
    )
    try:
        assert await conn.fetchval("SHOW application_name") == "pgbouncer-test"
    finally:
        await conn.close()
    psycopg = pytest.importorskip("psycopg")
    async with await psycopg.AsyncConnection.connect(
        bouncer.dsn("primary"), options="-c statement_timeout=1234"
    ) as pconn:
        cursor = await pconn.execute("SELECT pg_is_in_recovery()")
        assert await cursor.fetchone() == (False,)


# -- transaction pooling ---------------------------------------------------------------------


async def test_one_client_moves_between_server_connections(bouncer: PgBouncer) -> None:
    client = await asyncpg.connect(bouncer.dsn("primary"), statement_cache_size=0)
    try:
        async with client.transaction():
            first = await client.fetchval("SELECT pg_backend_pid()")
            # Session state: it stays with the server connection when the transaction ends.
            await client.execute("SET replica_router.marker = 'set-by-client'")
        async with holding(bouncer, "primary", first) as holder:
            # Another client's transaction got that server connection, and the setting.
            marker = "SELECT current_setting('replica_router.marker', true)"
            assert await holder.fetchval(marker) == "set-by-client"
            await holder.execute("RESET replica_router.marker")
            async with client.transaction():
                second = await client.fetchval("SELECT pg_backend_pid()")
                own_marker = await client.fetchval(marker)
    finally:
        await client.close()
    assert second != first
    assert own_marker in (None, "")


async def test_a_named_statement_stays_on_its_server_connection(bouncer: PgBouncer) -> None:
    # What SQLAlchemy's asyncpg dialect does: prepare once, keep the statement, reuse it.
    client = await asyncpg.connect(bouncer.dsn("primary"), statement_cache_size=0)
    try:
        async with client.transaction():
            statement = await client.prepare("SELECT pg_backend_pid()", name=unique_name())
            first = await statement.fetchval()
        async with holding(bouncer, "primary", first):
            with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
                async with client.transaction():
                    await statement.fetchval()
    finally:
        await client.close()


# -- prepared statements under load ----------------------------------------------------------


FAILING: dict[str, tuple[str, Callable[[str], str], dict[str, Any]]] = {
    # SQLAlchemy's defaults: asyncpg names statements __asyncpg_stmt_<n>__ per connection.
    "asyncpg-defaults": ("transaction", lambda url: url, {}),
    # Unique names, but SQLAlchemy caches each prepared statement on its connection
    # (prepared_statement_cache_size=100) and binds it again in a later transaction,
    # on a server connection that never saw it.
    "asyncpg-unique-names": (
        "transaction",
        lambda url: url,
        {"statement_cache_size": 0, "prepared_statement_name_func": unique_name},
    ),
    # Without SQLAlchemy's cache, outside a transaction: Parse and Bind are two
    # round trips, each its own transaction for PgBouncer.
    "asyncpg-unique-names-autocommit": (
        "AUTOCOMMIT",
        lambda url: url + "?prepared_statement_cache_size=0",
        {"statement_cache_size": 0, "prepared_statement_name_func": unique_name},
    ),
}

WORKING: dict[str, tuple[str, Callable[[str], str], dict[str, Any]]] = {
    # The unnamed statement, parsed again with every Bind: nothing outlives a round trip.
    "asyncpg-no-statement-cache": ("transaction", lambda url: url, {"statement_cache_size": 0}),
    "asyncpg-no-statement-cache-autocommit": (
        "AUTOCOMMIT",
        lambda url: url,
        {"statement_cache_size": 0},
    ),
    # Named statements live only as long as the transaction that prepared them.
    "asyncpg-unique-names-no-sqlalchemy-cache": (
        "transaction",
        lambda url: url + "?prepared_statement_cache_size=0",
        {"statement_cache_size": 0, "prepared_statement_name_func": unique_name},
    ),
}


@pytest.mark.parametrize("name", list(FAILING))
async def test_asyncpg_prepared_statements_fail(bouncer: PgBouncer, name: str) -> None:
    mode, make_url, connect_args = FAILING[name]
    isolation = None if mode == "transaction" else mode
    load = await load_until_error(
        make_url(bouncer.primary_url), connect_args, isolation_level=isolation
    )
    assert load.prepared_statement_errors(), f"no prepared statement error: {load}"
    assert set(load.errors) <= {"26000", "42P05"}, load.messages[:5]


@pytest.mark.parametrize("name", list(WORKING))
async def test_asyncpg_without_kept_statements_works(bouncer: PgBouncer, name: str) -> None:
    mode, make_url, connect_args = WORKING[name]
    isolation = None if mode == "transaction" else mode
    load = await run_load(make_url(bouncer.primary_url), connect_args, isolation_level=isolation)
    assert not load.errors, load.messages[:5]
    assert load.wrong == 0
    assert load.statements == TASKS * TRANSACTIONS * 4


async def test_psycopg_default_prepare_threshold_fails(bouncer: PgBouncer) -> None:
    # psycopg prepares a statement as _pg3_<n> after its 5th run on a connection; the
    # names of two connections collide on a server connection, or one is missing.
    load = await load_until_error(psycopg_url(bouncer.primary_url))
    assert load.prepared_statement_errors(), f"no prepared statement error: {load}"


async def test_psycopg_without_prepared_statements_works(bouncer: PgBouncer) -> None:
    url = psycopg_url(bouncer.primary_url)
    for isolation in (None, "AUTOCOMMIT"):
        load = await run_load(url, {"prepare_threshold": None}, isolation_level=isolation)
        assert not load.errors, load.messages[:5]
        assert load.wrong == 0
        assert load.statements == TASKS * TRANSACTIONS * 4


# -- lifecycle -------------------------------------------------------------------------------


def test_some_nodes_and_no_process_left_after_stop(local_cluster: LocalCluster) -> None:
    bouncer = PgBouncer(local_cluster, nodes=["replica-1"])
    with pytest.raises(Exception, match="not started"):
        bouncer.url("replica-1")
    with bouncer:
        base = bouncer.base_dir
        assert base is not None and base.is_dir()
        assert bouncer.nodes == ["replica-1"]
        assert bouncer.replica_urls == [bouncer.url("replica-1")]
        with pytest.raises(KeyError, match="not fronted"):
            _ = bouncer.primary_url
        assert bouncer.start() is bouncer  # a no-op when started
        assert bouncer.is_running("replica-1")
        processes = bouncer_processes(base)
        assert len(processes) == 1
        # The watchdog finds it by its working directory.
        assert set(processes) <= set(processes_under(str(base)))
        uid, _ = next(iter(processes.values()))
        assert uid != 0
        assert uid == server_user().uid
        assert "listening on 127.0.0.1:" in bouncer.log_tail("replica-1")
        assert bouncer.admin("SHOW DATABASES")  # one node: no need to name it
    assert bouncer_processes(base) == {}
    assert processes_under(str(base)) == []
    assert not base.exists()
    out = subprocess.run(["ps", "-ww", "-eo", "args="], capture_output=True, text=True).stdout
    assert str(base) not in out


WATCHDOG_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from replica_router.testing import LocalCluster, PgBouncer
    cluster = LocalCluster(replicas=0).start()
    bouncer = PgBouncer(cluster).start()
    print(bouncer.base_dir, flush=True)
    time.sleep(600)
    """
)


def test_watchdog_stops_pgbouncer_after_sigkill(local_cluster: LocalCluster) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG_CHILD.format(root=str(REPO_ROOT))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        base = Path(child.stdout.readline().strip())
        assert base.is_dir()
        assert len(bouncer_processes(base)) == 1
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 10
    while (bouncer_processes(base) or base.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bouncer_processes(base) == {}
    assert not base.exists()


def test_binary_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_PGBOUNCER", str(tmp_path / "nothing"))
    with pytest.raises(PgBouncerNotFoundError, match="REPLICA_ROUTER_PGBOUNCER"):
        pgbouncer_module.find_pgbouncer()
    monkeypatch.delenv("REPLICA_ROUTER_PGBOUNCER")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pgbouncer_module, "SYSTEM_PGBOUNCER", tmp_path / "pgbouncer")
    with pytest.raises(PgBouncerNotFoundError) as caught:
        pgbouncer_module.find_pgbouncer()
    message = str(caught.value)
    assert "apt-get install pgbouncer" in message
    assert "brew install pgbouncer" in message
    assert "REPLICA_ROUTER_PGBOUNCER" in message
    fake = tmp_path / "pgbouncer"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert pgbouncer_module.find_pgbouncer() == fake  # found on PATH
    monkeypatch.setenv("REPLICA_ROUTER_PGBOUNCER", str(fake))
    assert pgbouncer_module.find_pgbouncer() == fake


def test_arguments_are_checked(local_cluster: LocalCluster) -> None:
    with pytest.raises(TypeError, match="LocalCluster"):
        PgBouncer(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        PgBouncer(local_cluster, nodes=["primary", "primary"])
    with pytest.raises(ValueError, match="listen_port"):
        PgBouncer(local_cluster, settings={"listen_port": "1"})
    with pytest.raises(KeyError, match="no node named"):
        PgBouncer(local_cluster, nodes=["nowhere"]).start()
