"""What a failure means, decided in one place, and the bounded retry policy.

Each class of error has one action:

==========================  =================  ============================================
class                       SQLSTATE / type    action
==========================  =================  ============================================
CONNECTION                  08xxx, OSError,    node is down: a reader ejects a replica and
                            invalidated conn   moves on; the writer retries the primary
SHUTDOWN                    57P01, 57P02       as CONNECTION (admin or crash shutdown)
CANNOT_CONNECT_NOW          57P03              as CONNECTION (starting up, in recovery)
LEFT_RECOVERY               ReplicaPromoted-   as CONNECTION: a read ran on a replica just
                            Error              promoted; its result was discarded
TOO_MANY_CONNECTIONS        53300              retry after backoff; the node stays up
AUTHENTICATION              28P01, 28000,      the node refuses these credentials or this
                            3D000              database: marked down, logged once; a reader
                                               moves on, the writer is not retried
READ_ONLY                   25006              on the writer: the primary became a replica
                                               (failover); retried at checkout only
RECOVERY_CONFLICT           40001 on replica   whole read re-run on another node
SERIALIZATION               40001 on primary   whole transaction re-run (run_write)
DEADLOCK                    40P01              whole transaction re-run (run_write)
STATEMENT_TIMEOUT           57014              never retried
TIMEOUT                     client-side, out   a reader ejects the replica (it may hang) and
                            of a checkout      run_read re-runs elsewhere; never retried on
                                               the writer (during COMMIT: outcome unknown)
(a blocked event loop)      a checkout's bound not the node's fault: retried, nobody is
                            fired > 0.1 s late marked down (``fired_late``)
OTHER                       anything else      never retried
==========================  =================  ============================================

Nothing is ever re-run once a user's code has started, except by the explicit
``run_read`` / ``run_write`` helpers for whole units of work.
"""

from __future__ import annotations

import enum
import time

from ._drivers import DRIVERS
from ._exceptions import ReplicaPromotedError

__all__ = [
    "EJECTS_REPLICA",
    "NODE_DOWN",
    "ErrorKind",
    "classify",
    "fired_late",
    "is_connection_error",
    "never_sent",
    "refusal",
    "sqlstate_of",
]


class ErrorKind(enum.Enum):
    """The class of a database error, which decides what is done about it."""

    CONNECTION = "connection"
    SHUTDOWN = "shutdown"
    CANNOT_CONNECT_NOW = "cannot_connect_now"
    LEFT_RECOVERY = "left_recovery"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    AUTHENTICATION = "authentication"
    READ_ONLY = "read_only"
    SERIALIZATION = "serialization"
    DEADLOCK = "deadlock"
    STATEMENT_TIMEOUT = "statement_timeout"
    TIMEOUT = "timeout"
    OTHER = "other"


_BY_SQLSTATE = {
    "57P01": ErrorKind.SHUTDOWN,
    "57P02": ErrorKind.SHUTDOWN,
    "57P03": ErrorKind.CANNOT_CONNECT_NOW,
    "53300": ErrorKind.TOO_MANY_CONNECTIONS,
    "28P01": ErrorKind.AUTHENTICATION,  # invalid_password
    "28000": ErrorKind.AUTHENTICATION,  # invalid_authorization_specification (pg_hba, NOLOGIN)
    "3D000": ErrorKind.AUTHENTICATION,  # invalid_catalog_name: no such database
    "25006": ErrorKind.READ_ONLY,
    "40001": ErrorKind.SERIALIZATION,
    "40P01": ErrorKind.DEADLOCK,
    "57014": ErrorKind.STATEMENT_TIMEOUT,
}

_DRIVERS = tuple(DRIVERS.values())

# Kinds after which the node cannot be used: eject a replica, reconnect to the primary.
NODE_DOWN = frozenset(
    {
        ErrorKind.CONNECTION,
        ErrorKind.SHUTDOWN,
        ErrorKind.CANNOT_CONNECT_NOW,
        ErrorKind.LEFT_RECOVERY,
    }
)
# Kinds after which a replica is ejected at once: it is down, or may hang.
EJECTS_REPLICA = NODE_DOWN | {ErrorKind.TIMEOUT}


# asyncio's debug mode calls a callback slow from 0.1 s (``slow_callback_duration``).
_LOOP_BLOCKED = 0.1


def fired_late(started: float, seconds: float) -> bool:
    """Whether a timeout of ``seconds`` that started at ``started``
    (``time.perf_counter()``) fired on a blocked event loop.

    A CPU-bound or synchronous call stalls every task; a timer then fires late. An
    ``asyncio.timeout`` that does cancels its task even when the loop has just read the
    answer (the task's wake-up runs after the overdue timer). Such a timeout measured
    the loop, not the server.
    """
    return time.perf_counter() - started - seconds > _LOOP_BLOCKED


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what it wraps (``.orig``) and its causes, without cycles."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        orig = getattr(item, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, item.__cause__]
    return seen


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, wherever SQLAlchemy or asyncpg put it."""
    for item in _chain(exc):
        state = getattr(item, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def classify(exc: BaseException, *, during_checkout: bool = False) -> ErrorKind:
    """Classify a failure.

    Args:
        exc: what was raised.
        during_checkout: the error came from opening a connection or its BEGIN. A
            timeout there means the node does not answer; elsewhere a timeout is a
            query that took too long and says nothing about the node.
    """
    state = sqlstate_of(exc)
    if state is not None:
        if state.startswith("08"):
            return ErrorKind.CONNECTION
        if state in _BY_SQLSTATE:
            return _BY_SQLSTATE[state]
    elif _refused(exc) is not None:
        return ErrorKind.AUTHENTICATION
    timed_out = False
    for item in _chain(exc):
        if isinstance(item, ReplicaPromotedError):
            return ErrorKind.LEFT_RECOVERY
        if getattr(item, "connection_invalidated", False):
            return ErrorKind.CONNECTION
        if isinstance(item, TimeoutError):
            if during_checkout:
                return ErrorKind.CONNECTION
            timed_out = True  # a driver's statement bound (asyncpg's command_timeout)
            continue
        if isinstance(item, OSError):
            return ErrorKind.CONNECTION
        if any(driver.lost_connection(item) for driver in _DRIVERS):
            return ErrorKind.CONNECTION
    if state is None and during_checkout and _is_interface_error(exc):
        return ErrorKind.CONNECTION
    return ErrorKind.TIMEOUT if timed_out else ErrorKind.OTHER


# What a refusal means, for messages that may reach a client (no user or database name).
_REFUSED = {
    "28P01": "password authentication failed",
    "28000": "the role may not connect (NOLOGIN, or no pg_hba.conf entry)",
    "3D000": "the database does not exist",
}


def _refused(exc: BaseException) -> tuple[str, str] | None:
    """The SQLSTATE and the server's message of a refused connection, or None.

    asyncpg reports the SQLSTATE; libpq (psycopg) only the server's message, which its
    driver reads.
    """
    for item in _chain(exc):
        state = getattr(item, "sqlstate", None)
        if isinstance(state, str) and state in _REFUSED:
            text = str(item).splitlines()[0] if str(item) else ""
            # SQLAlchemy's asyncpg adapter prefixes "<class '...Error'>: ".
            return state, text.rpartition("'>: ")[2].strip()
        for driver in _DRIVERS:
            found = driver.refused(item)
            if found is not None:
                return found
    return None


def refusal(exc: BaseException) -> tuple[str, str] | None:
    """For a server that refused the connection (28P01, 28000, 3D000): a short reason
    without names, for error messages, and the server's own message, for the log; both
    end with the SQLSTATE."""
    found = _refused(exc)
    if found is None:
        return None
    state, message = found
    return f"{_REFUSED[state]} ({state})", f"{message or _REFUSED[state]} ({state})"


def _is_interface_error(exc: BaseException) -> bool:
    return any(type(item).__name__ == "InterfaceError" for item in _chain(exc))


def never_sent(exc: BaseException) -> bool:
    """The driver refused to send the command at all (the connection was known
    broken): the server never saw it."""
    return any(driver.never_sent(item) for item in _chain(exc) for driver in _DRIVERS)


def is_connection_error(exc: BaseException, *, during_checkout: bool = False) -> bool:
    """True when the node behind the connection cannot be used any more."""
    return classify(exc, during_checkout=during_checkout) in NODE_DOWN
