"""The driver seam: what the router needs of a PostgreSQL driver, behind one Protocol.

Everything specific to a driver and to SQLAlchemy's adapter for it lives in one
class here: how a transaction's BEGIN is sent eagerly (it proves a pooled
connection at no extra round trip), how a connection is made READ ONLY, how a
value is read on the raw connection (the commit's WAL position, replay waits),
the probes' own connections, which exceptions mean a lost connection, and what a
transaction-mode pooler in front of a server needs. A second driver is one more
module with one class registered in ``DRIVERS`` (psycopg 3: ``_psycopg.py``).

Example::

    driver = driver_for(url)                  # by the URL's drivername
    lsn = await driver.fetch_value(raw.driver_connection, "SELECT 1", seconds=3.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from sqlalchemy.engine import URL

from ._exceptions import ConfigurationError
from ._psycopg import PsycopgDriver

__all__ = [
    "DRIVERS",
    "AsyncpgDriver",
    "Driver",
    "Pooler",
    "ProbeConnection",
    "driver_connection",
    "driver_for",
]

Pooler = Literal["none", "transaction"]


class ProbeConnection(Protocol):
    """A connection of its own, outside every pool (health probes, ``check``)."""

    async def fetch_row(self, sql: str) -> Sequence[Any]:
        """The first row of ``sql``, as a sequence of column values."""
        ...

    def is_closed(self) -> bool: ...

    async def close(self) -> None:
        """Say goodbye to the server and close."""
        ...

    def terminate(self) -> None:
        """Close at once, without waiting for the server (it may be frozen)."""
        ...


class Driver(Protocol):
    """One driver, and SQLAlchemy's asyncio adapter for it."""

    name: str
    # SQLAlchemy's drivername, ``postgresql+asyncpg``.
    drivername: str
    # SQLAlchemy's checkout of an idle pooled connection awaits nothing with this
    # adapter (its read-only flag and isolation level are plain attributes), so it can
    # run outside a greenlet.
    checkout_without_io: bool

    def lost_connection(self, error: BaseException) -> bool:
        """Whether this driver's exception (not SQLAlchemy's wrapper) means the
        connection is gone; errors with a SQLSTATE are classified by it first."""
        ...

    def refused(self, error: BaseException) -> tuple[str, str] | None:
        """For this driver's exception of a server that refused the connection
        (authentication, authorization, no such database) but that carries no
        SQLSTATE: the SQLSTATE (28P01, 28000, 3D000) and the server's message."""
        ...

    def connect_args(
        self,
        connect_args: Mapping[str, Any],
        *,
        timeout: float,
        application_name: str,
        pooler: Pooler,
    ) -> dict[str, Any]:
        """``connect_args`` for ``create_async_engine``, with our defaults added; with
        ``pooler="transaction"``, none of the session state such a pooler loses
        (named prepared statements)."""
        ...

    def read_timeout_args(self, seconds: float, pooler: Pooler) -> dict[str, Any]:
        """``connect_args`` that bound every statement of a replica's connections."""
        ...

    def set_read_only(self, dbapi_connection: Any) -> None:
        """``connect`` hook: every transaction on this connection begins READ ONLY."""
        ...

    def never_sent(self, error: BaseException) -> bool:
        """Whether this driver's exception says the command was never sent (the
        connection was already known closed or busy), so the server never saw it."""
        ...

    def in_hot_standby(self, driver_connection: Any) -> bool | None:
        """What the server last reported as ``in_hot_standby`` on the driver's own
        connection (PostgreSQL >= 14 reports every change; no round trip), or None
        when it did not report it. Runs after every statement on a replica."""
        ...

    def abort(self, connection: Any) -> None:
        """Drop SQLAlchemy's pooled ``connection`` at once, with no goodbye to the
        server (a frozen one never answers: SQLAlchemy's own close waits 2 s)."""
        ...

    async def begin(self, connection: Any, seconds: float) -> None:
        """Send the transaction's BEGIN now, on SQLAlchemy's pooled connection (it
        has ``dbapi_connection``, the adapter, and ``driver_connection``); a
        ``TimeoutError`` if the server has not answered within ``seconds``."""
        ...

    async def rollback(self, connection: Any) -> bool:
        """Roll the transaction back through the driver, as SQLAlchemy's adapter would,
        but without a greenlet; then its own rollback has nothing left to do. False:
        this driver does not, and SQLAlchemy's close must run."""
        ...

    async def fetch_value(self, driver_connection: Any, sql: str, seconds: float) -> Any:
        """The first column of the first row, on the driver's own connection, within
        ``seconds`` (enforced by the driver: no extra task)."""
        ...

    async def connect(
        self,
        url: URL,
        connect_args: Mapping[str, Any],
        *,
        connect_timeout: float,
        application_name: str,
    ) -> ProbeConnection:
        """A connection outside every pool, as the node's engine would open it."""
        ...


def driver_connection(connection: Any) -> Any:
    """The driver's own connection under SQLAlchemy's pooled ``connection``: its
    ``driver_connection`` without the three property calls behind it (every asyncio
    adapter of SQLAlchemy keeps the driver's connection as ``_connection``)."""
    try:
        return connection.dbapi_connection._connection
    except AttributeError:  # pragma: no cover - an adapter that does not
        return connection.driver_connection


# Keys of SQLAlchemy's asyncpg adapter that asyncpg.connect() does not take.
_ASYNCPG_ADAPTER_KEYS = (
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
    "async_creator_fn",
)


class _AsyncpgProbe:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch_row(self, sql: str) -> Sequence[Any]:
        row = await self._conn.fetchrow(sql)
        return tuple(row) if row is not None else ()

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def close(self) -> None:
        await self._conn.close()

    def terminate(self) -> None:
        self._conn.terminate()


# asyncpg connection configurations with the BEGIN bound as command_timeout, by the
# configuration and the bound (namedtuples: hashed by value).
_BOUNDED_CONFIGS: dict[tuple[Any, float], Any] = {}


class AsyncpgDriver:
    """asyncpg, through SQLAlchemy's ``postgresql+asyncpg`` adapter."""

    name = "asyncpg"
    drivername = "postgresql+asyncpg"
    checkout_without_io = True
    # asyncpg's "connection was closed in the middle of operation" and friends.
    _LOST = frozenset({"ConnectionDoesNotExistError", "ConnectionFailureError"})

    def lost_connection(self, error: BaseException) -> bool:
        return type(error).__name__ in self._LOST or (
            type(error).__name__ == "InternalClientError"
            and type(error).__module__.startswith("asyncpg")
        )

    def refused(self, error: BaseException) -> tuple[str, str] | None:
        return None  # asyncpg's errors carry the server's SQLSTATE

    def connect_args(
        self,
        connect_args: Mapping[str, Any],
        *,
        timeout: float,
        application_name: str,
        pooler: Pooler,
    ) -> dict[str, Any]:
        args = dict(connect_args)
        args.setdefault("timeout", timeout)
        if pooler == "transaction":
            # No named prepared statements: a transaction-mode pooler runs the next
            # transaction on another server connection, which never prepared them.
            # asyncpg then uses the unnamed statement (parsed at each execution).
            args.setdefault("statement_cache_size", 0)
        args["server_settings"] = {
            "application_name": application_name,
            **args.get("server_settings", {}),
        }
        return args

    def read_timeout_args(self, seconds: float, pooler: Pooler) -> dict[str, Any]:
        # Enforced by asyncpg on its own timer (no task per statement); it raises a
        # builtin TimeoutError, also when the server is frozen and answers nothing.
        return {"command_timeout": seconds}

    def set_read_only(self, dbapi_connection: Any) -> None:
        # The adapter's own flag: its BEGIN says READ ONLY. Set once per connection;
        # the equivalent execution option costs about 50 us per checkout.
        if not hasattr(dbapi_connection, "readonly"):
            raise ConfigurationError(
                "replica-router needs SQLAlchemy's asyncpg adapter (READ ONLY transactions)"
            )
        dbapi_connection.readonly = True

    def never_sent(self, error: BaseException) -> bool:
        # Raised before anything is written to the socket: "cannot switch to state 15;
        # another operation (2) is in progress" (a session the server already ended),
        # and "connection is closed".
        name = type(error).__name__
        text = str(error)
        return type(error).__module__.startswith("asyncpg") and (
            (name == "InternalClientError" and "cannot switch to state" in text)
            or (name == "InterfaceError" and "connection is closed" in text)
        )

    def in_hot_standby(self, driver_connection: Any) -> bool | None:
        # Its __getattr__ straight away: getattr() would first fail the normal lookup,
        # and format an AttributeError for it, twice per read (measured 740 -> 340 ns).
        try:
            value: str = driver_connection.get_settings().__getattr__("in_hot_standby")
        except AttributeError:  # PostgreSQL < 14 does not report it
            return None
        return value == "on"

    def abort(self, connection: Any) -> None:
        connection.driver_connection.terminate()

    async def begin(self, connection: Any, seconds: float) -> None:
        dbapi_connection = connection.dbapi_connection
        driver_connection = dbapi_connection._connection
        start = getattr(dbapi_connection, "_start_transaction", None)
        if start is None:  # pragma: no cover - an adapter without it: a real statement
            await driver_connection.execute("SELECT 1", timeout=seconds)
            return
        if getattr(dbapi_connection, "_started", None) is True:  # SQLAlchemy 2.0
            return
        if (
            getattr(dbapi_connection, "_started", None) is None
            and getattr(dbapi_connection, "_transaction", None) is not None
        ):
            return
        # The adapter's BEGIN (asyncpg's Transaction.start) takes no timeout: it gets
        # the connection's command_timeout, so that is the bound while it runs.
        # asyncpg's own timer, not asyncio.timeout: the swap costs about 1 us a read,
        # asyncio.timeout about 7 (measured, uvloop), and asyncpg's timer does nothing
        # once the answer is in, where asyncio.timeout cancels a task whose answer a
        # blocked loop already read.
        config = driver_connection._config
        key = (config, seconds)
        bounded = _BOUNDED_CONFIGS.get(key)
        if bounded is None:
            # One per configuration and bound (the bound is the floor while a node
            # answers quickly): ``_replace`` each read was a tenth of the driver's cost.
            if len(_BOUNDED_CONFIGS) >= 256:
                _BOUNDED_CONFIGS.clear()
            bounded = _BOUNDED_CONFIGS[key] = config._replace(command_timeout=seconds)
        driver_connection._config = bounded
        try:
            await start()
        finally:
            driver_connection._config = config

    async def rollback(self, connection: Any) -> bool:
        adapter = connection.dbapi_connection
        if not hasattr(adapter, "_transaction"):  # pragma: no cover - another adapter
            return False
        transaction = adapter._transaction
        if transaction is not None:
            try:
                await transaction.rollback()
            finally:
                # As the adapter's own rollback: once asyncpg was asked, it is done.
                adapter._transaction = None
                if getattr(adapter, "_started", None) is not None:  # SQLAlchemy 2.0
                    adapter._started = False
        return True

    async def fetch_value(self, driver_connection: Any, sql: str, seconds: float) -> Any:
        return await driver_connection.fetchval(sql, timeout=seconds)

    async def connect(
        self,
        url: URL,
        connect_args: Mapping[str, Any],
        *,
        connect_timeout: float,
        application_name: str,
    ) -> ProbeConnection:
        import asyncpg

        dialect = url.set(drivername=self.drivername).get_dialect()()
        cargs, cparams = dialect.create_connect_args(url)
        params = {**cparams, **connect_args}
        for key in _ASYNCPG_ADAPTER_KEYS:
            params.pop(key, None)
        params["timeout"] = connect_timeout
        # Probes run one query per interval: no named statements, which a
        # transaction-mode pooler in front of the node would break.
        params["statement_cache_size"] = 0
        params["server_settings"] = {
            **params.get("server_settings", {}),
            "application_name": application_name,
        }
        return _AsyncpgProbe(await asyncpg.connect(*cargs, **params))


DRIVERS: dict[str, Driver] = {d.drivername: d for d in (AsyncpgDriver(), PsycopgDriver())}


def driver_for(url: URL) -> Driver:
    """The driver of a (normalised) URL."""
    try:
        return DRIVERS[url.drivername]
    except KeyError:
        known = ", ".join(f"{name}://" for name in DRIVERS)
        raise ConfigurationError(
            f"unsupported driver {url.drivername!r}; expected one of {known}"
        ) from None
