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

    def lost_connection(self, error: BaseException) -> bool:
        # psycopg raises OperationalError without a SQLSTATE for a connection that
        # failed or was lost ("server closed the connection unexpectedly").
        module = type(error).__module__
        return (
            module.startswith("psycopg")
            and type(error).__name__ == "OperationalError"
            and getattr(error, "sqlstate", None) is None
        )

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

    def set_read_only(self, dbapi_connection: Any) -> None:
        set_read_only = getattr(dbapi_connection, "set_read_only", None)
        if set_read_only is None:
            raise ConfigurationError(
                "replica-router needs SQLAlchemy's psycopg adapter (READ ONLY transactions)"
            )
        set_read_only(True)  # no round trip: psycopg adds READ ONLY to its BEGIN

    async def begin(self, connection: Any) -> None:
        conn = connection.driver_connection
        start = getattr(conn, "_start_query", None)
        if start is None:  # pragma: no cover - a psycopg without it: a real statement
            await conn.execute("SELECT 1")
            return
        async with conn.lock:
            await conn.wait(start())  # BEGIN unless in a transaction or autocommit

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
