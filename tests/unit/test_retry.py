"""Error classification: one place decides what each failure means."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from replica_router import ErrorKind
from replica_router._retry import NODE_DOWN, classify


class FakeAsyncpgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__("x")
        self.sqlstate = sqlstate


def wrapped(sqlstate: str) -> DBAPIError:
    return DBAPIError("SELECT 1", {}, FakeAsyncpgError(sqlstate))


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("08006", ErrorKind.CONNECTION),
        ("08003", ErrorKind.CONNECTION),
        ("57P01", ErrorKind.SHUTDOWN),
        ("57P02", ErrorKind.SHUTDOWN),
        ("57P03", ErrorKind.CANNOT_CONNECT_NOW),
        ("53300", ErrorKind.TOO_MANY_CONNECTIONS),
        ("25006", ErrorKind.READ_ONLY),
        ("40001", ErrorKind.SERIALIZATION),
        ("40P01", ErrorKind.DEADLOCK),
        ("57014", ErrorKind.STATEMENT_TIMEOUT),
        ("23505", ErrorKind.OTHER),
    ],
)
def test_sqlstates(sqlstate: str, kind: ErrorKind) -> None:
    assert classify(wrapped(sqlstate)) is kind


def test_raw_os_errors_are_connection_errors() -> None:
    assert classify(ConnectionRefusedError(111, "refused")) is ErrorKind.CONNECTION
    assert classify(ConnectionResetError()) is ErrorKind.CONNECTION


def test_a_timeout_is_a_dead_node_only_at_checkout() -> None:
    # Elsewhere it is the driver's statement bound: it ejects a replica (which may
    # hang) but never counts as a lost connection to retry a write on.
    assert classify(TimeoutError()) is ErrorKind.TIMEOUT
    assert ErrorKind.TIMEOUT not in NODE_DOWN
    assert classify(TimeoutError(), during_checkout=True) is ErrorKind.CONNECTION


def test_invalidated_connection_and_asyncpg_lost_connection() -> None:
    error = DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True)
    assert classify(error) is ErrorKind.CONNECTION
    lost = asyncpg.exceptions.ConnectionDoesNotExistError("closed")
    assert classify(lost) is ErrorKind.CONNECTION


def test_cause_chain_is_followed() -> None:
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert classify(outer) is ErrorKind.CONNECTION
