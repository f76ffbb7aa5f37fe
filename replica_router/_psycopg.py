"""psycopg 3 (async) behind the driver seam, through SQLAlchemy's ``postgresql+psycopg``.

psycopg is imported only when a psycopg node is used (the ``psycopg`` extra).

* BEGIN is sent eagerly with psycopg's own transaction start (``_start_query``, the
  command it would send before the first statement: ``BEGIN [ISOLATION LEVEL ...]
  [READ ONLY]``), so proving a pooled connection costs no extra round trip.
* READ ONLY: ``set_read_only(True)`` once per replica connection; psycopg puts it in
  every BEGIN.
* A value outside a transaction (the WAL position after COMMIT, replay waits):
  autocommit is switched on for that one statement (no round trip while idle), so
  psycopg sends no BEGIN/ROLLBACK around it.
* ``READ_TIMEOUT``: the server's ``statement_timeout`` (psycopg has no client-side
  bound per statement, so a frozen server is not cut; the BEGIN bound still is).
* Behind a transaction-mode pooler: ``prepare_threshold=None`` (no server-side
  prepared statements).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import URL

from ._exceptions import ConfigurationError

__all__ = ["PsycopgDriver"]

# The server's messages for the connections it refuses, and their SQLSTATEs.
_REFUSALS = (
    ("28P01", ("password authentication failed",)),
    ("28000", ("is not permitted to log in",)),
    ("28000", ("no pg_hba.conf entry",)),
    ("28000", ("pg_hba.conf rejects",)),
    ("28000", ("role", "does not exist")),
    ("3D000", ("database", "does not exist")),
)


class _PsycopgProbe:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch_row(self, sql: str) -> Sequence[Any]:
        cursor = await self._conn.execute(sql)
        row = await cursor.fetchone()
        return tuple(row) if row is not None else ()

    def is_closed(self) -> bool:
        return bool(self._conn.closed)

    async def close(self) -> None:
        await self._conn.close()

    def terminate(self) -> None:
        # Closes the socket at once; a frozen server is never waited for.
        self._conn.pgconn.finish()


class PsycopgDriver:
    """psycopg 3, through SQLAlchemy's ``postgresql+psycopg`` asyncio adapter."""

    name = "psycopg"
    drivername = "postgresql+psycopg"
    # Its adapter awaits psycopg to set a connection's read-only flag (the primary's
    # reader sessions, at every checkout).
    checkout_without_io = False

    def lost_connection(self, error: BaseException) -> bool:
        # psycopg raises OperationalError without a SQLSTATE for a connection that
        # failed or was lost ("server closed the connection unexpectedly").
        module = type(error).__module__
        return (
            module.startswith("psycopg")
            and type(error).__name__ == "OperationalError"
            and getattr(error, "sqlstate", None) is None
        )

    def refused(self, error: BaseException) -> tuple[str, str] | None:
        # libpq reports a connection the server refused without a SQLSTATE, only the
        # server's FATAL message (in the server's lc_messages; English by default).
        if not self.lost_connection(error):
            return None
        _, fatal, message = str(error).partition("FATAL:")
        message = message.strip().splitlines()[0] if fatal and message.strip() else ""
        for state, words in _REFUSALS:
            if all(word in message for word in words):
                return state, message
        return None

    def connect_args(
        self,
        connect_args: Mapping[str, Any],
        *,
        timeout: float,
        application_name: str,
        pooler: str,
    ) -> dict[str, Any]:
        args = dict(connect_args)
        # libpq's connect_timeout is whole seconds, at least 2.
        args.setdefault("connect_timeout", max(2, math.ceil(timeout)))
        args.setdefault("application_name", application_name)
        if pooler == "transaction":
            args.setdefault("prepare_threshold", None)
        return args

    def read_timeout_args(self, seconds: float, pooler: str) -> dict[str, Any]:
        # psycopg has no client-side statement bound: the server's statement_timeout
        # cuts a slow query (57014), but a frozen server answers nothing at all.
        if pooler == "transaction":
            return {}  # poolers refuse (or drop) the options startup parameter
        return {"options": f"-c statement_timeout={max(1, round(seconds * 1000))}"}

    def set_read_only(self, dbapi_connection: Any) -> None:
        set_read_only = getattr(dbapi_connection, "set_read_only", None)
        if set_read_only is None:
            raise ConfigurationError(
                "replica-router needs SQLAlchemy's psycopg adapter (READ ONLY transactions)"
            )
        set_read_only(True)  # no round trip: psycopg adds READ ONLY to its BEGIN

    def never_sent(self, error: BaseException) -> bool:
        # psycopg checks the connection before sending: "the connection is closed".
        return (
            type(error).__module__.startswith("psycopg")
            and type(error).__name__ == "OperationalError"
            and str(error).startswith("the connection is closed")
        )

    def in_hot_standby(self, driver_connection: Any) -> bool | None:
        value = driver_connection.info.parameter_status("in_hot_standby")
        return None if value is None else value in ("on", b"on")

    def abort(self, connection: Any) -> None:
        connection.driver_connection.pgconn.finish()  # closes the socket, no waiting

    async def begin(self, connection: Any, seconds: float) -> None:
        conn = connection.driver_connection
        start = getattr(conn, "_start_query", None)
        # asyncio.timeout, not wait_for: no extra task per checkout.
        async with asyncio.timeout(seconds):
            if start is None:  # pragma: no cover - a psycopg without it: a real statement
                await conn.execute("SELECT 1")
                return
            async with conn.lock:
                await conn.wait(start())  # BEGIN unless in a transaction or autocommit

    async def rollback(self, connection: Any) -> bool:
        return False  # SQLAlchemy's close rolls back (one greenlet)

    async def fetch_value(self, driver_connection: Any, sql: str, seconds: float) -> Any:
        conn = driver_connection
        async with asyncio.timeout(seconds):
            if conn.autocommit or conn.info.transaction_status != _IDLE:
                cursor = await conn.execute(sql)
            else:
                await conn.set_autocommit(True)
                try:
                    cursor = await conn.execute(sql)
                finally:
                    await conn.set_autocommit(False)
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def connect(
        self,
        url: URL,
        connect_args: Mapping[str, Any],
        *,
        connect_timeout: float,
        application_name: str,
    ) -> _PsycopgProbe:
        import psycopg

        dialect = url.set(drivername=self.drivername).get_dialect()()
        cargs, cparams = dialect.create_connect_args(url)
        params = {**cparams, **connect_args}
        # Probes run one query per interval: never prepared (a transaction-mode
        # pooler in front of the node would break prepared statements).
        params["prepare_threshold"] = None
        params["connect_timeout"] = max(2, math.ceil(connect_timeout))
        params["application_name"] = application_name
        conn = await psycopg.AsyncConnection.connect(*cargs, autocommit=True, **params)
        return _PsycopgProbe(conn)


# psycopg.pq.TransactionStatus.IDLE, without importing psycopg at import time.
_IDLE = 0
