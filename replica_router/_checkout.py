"""Checkout: a session whose pooled connection is proven, with bounded retries.

A session is handed out only after its connection did a round trip: the
transaction's BEGIN, sent now instead of with the first statement (so no extra
ping), or whatever proof the caller asks for instead. A failure there is
classified once; a node that is down is marked so at once (passive health), and
the attempt is retried with backoff (tenacity), never after user code has run.
In-flight sessions and checkout latency are counted per node. Nothing here knows
reads from writes: callers pick the node and the sessionmaker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sa_queue
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from ._drivers import driver_connection
from ._nodes import Node, Role
from ._pool import HandOffQueue
from ._retry import (
    NODE_DOWN,
    ErrorKind,
    classify,
    fired_late,
    is_connection_error,
    refusal,
)
from ._settings import RouterSettings
from ._tracing import AutoTracing, CheckoutSpan, Tracing

__all__ = [
    "Checkout",
    "CheckoutFailed",
    "NotInRecovery",
    "Skip",
    "abort",
    "close_quietly",
    "query_value",
    "raw_connection",
]

T = TypeVar("T")

logger = logging.getLogger("replica_router")

# Checkout failures worth another attempt: the node is down or momentarily full, or
# it refused the credentials (another node may not: never the primary again).
_RETRY_AT_CHECKOUT = NODE_DOWN | {ErrorKind.TOO_MANY_CONNECTIONS, ErrorKind.AUTHENTICATION}

# The BEGIN bound: this many times the node's moving-average round trip, with a
# floor that an event loop busy with other requests does not reach.
_BEGIN_FACTOR = 20.0
_BEGIN_FLOOR = 0.25

# A proof: given the session's connection, prove it (one round trip) and say how
# the session was decided ("replica", "replica_after_check", ...).
Prove = Callable[[Node, AsyncConnection], Awaitable[str]]


class CheckoutFailed(Exception):
    """One checkout attempt failed in a way worth another attempt (``final``: not on
    this node, which refused the credentials, and no other node can take it)."""

    def __init__(self, node: Node, error: BaseException, *, blameless: bool = False) -> None:
        super().__init__(node.name)
        self.node = node
        self.error = error
        # The bound fired on a blocked event loop: the node may well be fine.
        self.blameless = blameless
        refused = refusal(error)
        self.final = refused is not None and node.role is Role.PRIMARY
        # What happened, for the error a caller raises (no user or database name).
        self.summary = (
            f"refused the connection: {refused[0]}; check the user, password and "
            "database in its URL"
            if refused is not None
            else f"is unreachable ({type(error).__name__})"
        )


class Skip(Exception):
    """Raised by a proof: the node is fine, only not for this session; its
    connection stays in the pool and the caller tries another node."""


class NotInRecovery(Skip):
    """The replica's server is not in recovery (any more): it was promoted."""


class Checkout:
    """Opens proven sessions on nodes and retries failed attempts.

    Args:
        settings: timeouts and retry bounds.
        on_node_down: called once a request's error marked a node down.

    ``trace`` makes the sessions' spans; ``None`` when tracing is off (see ``_tracing``).
    """

    __slots__ = ("_blocked_warned_at", "_on_node_down", "_settings", "trace")

    def __init__(self, settings: RouterSettings, on_node_down: Callable[[Node], None]) -> None:
        self._settings = settings
        self._on_node_down = on_node_down
        self._blocked_warned_at = -60.0
        self.trace: Tracing | None = AutoTracing(self)

    async def open(
        self,
        node: Node,
        maker: async_sessionmaker[AsyncSession],
        prove: Prove | None = None,
        span: CheckoutSpan | None = None,
    ) -> tuple[AsyncSession, str]:
        """A session on ``node`` whose connection did a round trip, counted in flight.

        Args:
            prove: instead of BEGIN, e.g. read the replay position (a wait is not
                counted as the node's latency).
            span: told of a failed attempt.

        Raises:
            CheckoutFailed: the node is down or full; worth another attempt.
            Skip: from ``prove``.
        """
        state = node.state
        state.in_flight += 1
        session = maker()
        started = time.perf_counter()
        decision = "replica"
        bound: float | None = None
        begun = 0.0
        blocked = False
        held: HandOffQueue[Any] | None = None
        try:
            conn: AsyncConnection | None = None
            sync: Connection | None
            ready = prove is None and _checkout_without_io(node, session.sync_session)
            if isinstance(ready, HandOffQueue):
                # Every connection is out: wait for this task's turn here, so that
                # the checkout needs no greenlet under contention either.
                held = ready
                await _take_turn(held, node)
                ready = _checkout_without_io(node, session.sync_session)
            if ready is True:
                # What ``await session.connection()`` does, without its greenlet (each
                # maps a fresh Python frame stack: about a tenth of a read's own cost).
                checked_out = session.sync_session.connection()
                sync, raw = checked_out, checked_out.connection
            else:
                conn = await session.connection()
                sync, raw = conn.sync_connection, await raw_connection(conn)
            try:
                if prove is not None and conn is not None:
                    decision = await prove(node, conn)
                else:
                    bound = self.begin_bound(node)
                    begun = time.perf_counter()
                    await node.driver.begin(raw, bound)
                if (
                    node.role is Role.REPLICA
                    and node.driver.in_hot_standby(driver_connection(raw)) is False
                ):
                    self._left_recovery(node)
            except Skip:
                raise
            except BaseException as exc:
                # Judged now, before the awaits below add their own delay.
                blocked = (
                    bound is not None and isinstance(exc, TimeoutError) and fired_late(begun, bound)
                )
                await _invalidate(node, sync, raw, exc)
                raise
        except BaseException as exc:
            state.in_flight -= 1
            if held is not None:
                held.settle()
            await close_quietly(session)
            if span is not None and not isinstance(exc, Skip):
                span.failed_attempt(node, exc)
            if blocked:
                self._note_blocked_loop(node)
                raise CheckoutFailed(node, exc, blameless=True) from exc
            if isinstance(exc, Exception) and not isinstance(exc, Skip):
                kind = classify(exc, during_checkout=True)
                if kind in _RETRY_AT_CHECKOUT:
                    self.note_failure(node, exc, kind)
                    raise CheckoutFailed(node, exc) from exc
            raise
        if prove is None:
            state.observe_checkout(time.perf_counter() - started)
        return session, decision

    def _left_recovery(self, node: Node) -> None:
        """A replica whose server reported leaving recovery (a promotion) serves no
        read, from this checkout on: PostgreSQL >= 14 reports ``in_hot_standby`` with
        the answer to the round trip just made, so the check costs nothing."""
        state = node.state
        if state.in_recovery is not False:
            state.in_recovery = False
            logger.warning("replica %s left recovery (promoted?); it serves no reads", node.name)
            self._on_node_down(node)
        raise NotInRecovery(node.name)

    def _note_blocked_loop(self, node: Node) -> None:
        """A BEGIN bound fired on a blocked event loop: retried, nobody marked down.
        Logged at most once a minute: the fix is in the application, not the node."""
        now = time.monotonic()
        if now - self._blocked_warned_at >= 60.0:
            self._blocked_warned_at = now
            logger.warning(
                "the event loop was blocked past a checkout's bound on %s %s (a "
                "synchronous or CPU-bound call in a task?); retried, not marked down",
                node.role.value,
                node.name,
            )

    def begin_bound(self, node: Node) -> float:
        """Seconds a proving round trip may take on ``node``: many times its usual
        latency, at least ``_BEGIN_FLOOR``, at most ``connect_timeout``. A frozen
        server then costs each request this bound once, not the connect timeout."""
        latency = node.state.latency
        cap = self._settings.connect_timeout
        if latency is None:
            return cap
        bound = _BEGIN_FACTOR * latency
        # Whole hundredths above the floor: a few distinct bounds, each one asyncpg
        # configuration the driver keeps (see ``AsyncpgDriver.begin``).
        bound = math.ceil(bound * 100.0) / 100.0 if bound > _BEGIN_FLOOR else _BEGIN_FLOOR
        return min(cap, bound)

    @staticmethod
    async def release(node: Node, session: AsyncSession) -> None:
        """Close a session from :meth:`open`; its connection goes back to the pool."""
        node.state.in_flight -= 1
        await close_session(node, session)

    def note_failure(self, node: Node, exc: BaseException, kind: ErrorKind) -> None:
        """Count a failure; a node-down kind marks the node down (once, logged)."""
        state = node.state
        state.checkout_failures += 1
        refused = refusal(exc) if kind is ErrorKind.AUTHENTICATION else None
        if refused is not None:
            # Retrying cannot fix a wrong password: one line per node, no traceback.
            if state.mark_down(f"refused: {refused[0]}", refused[1]):
                logger.warning(
                    "%s %s refused the connection: %s; check the user, password and "
                    "database in its URL",
                    node.role.value,
                    node.name,
                    refused[1],
                )
                self._on_node_down(node)
            return
        if kind in NODE_DOWN or (kind is ErrorKind.TIMEOUT and node.role is Role.REPLICA):
            message = f"{kind.value}: {type(exc).__name__}"
            if state.mark_down(f"down: {message}", message):
                logger.warning(
                    "%s %s marked down by a request (%s)", node.role.value, node.name, message
                )
                self._on_node_down(node)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``: full jitter, capped."""
        s = self._settings
        return random.uniform(0, min(s.retry_backoff_max, s.retry_backoff * 2 ** (attempt - 1)))

    async def with_retries(self, attempt: Callable[[int], Awaitable[T]], attempts: int) -> T:
        """Run ``attempt(1)``; if it fails with ``CheckoutFailed``, retry with tenacity.

        The first attempt skips tenacity entirely: the common path allocates nothing.
        """
        try:
            return await attempt(1)
        except CheckoutFailed as exc:
            if attempts <= 1 or exc.final:
                raise
        async for retry in self._retrying(attempts - 1):
            with retry:
                return await attempt(retry.retry_state.attempt_number + 1)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrying(self, attempts: int) -> AsyncRetrying:
        def wait(state: RetryCallState) -> float:
            # Moving to another node needs no pause; retrying the same one backs off.
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            if isinstance(error, CheckoutFailed) and error.node.role is Role.REPLICA:
                return 0.0
            return self.backoff(state.attempt_number)

        return AsyncRetrying(
            stop=stop_after_attempt(attempts) | stop_after_delay(self._settings.checkout_timeout),
            wait=wait,
            # Only our own marker: CancelledError and everything else go straight through.
            retry=retry_if_exception(lambda e: isinstance(e, CheckoutFailed) and not e.final),
            reraise=True,
        )


async def query_value(node: Node, sql: str, seconds: float) -> Any:
    """One value from ``sql`` on a pooled connection of ``node``, without a transaction."""
    async with node.engine.connect() as conn:
        raw = (await raw_connection(conn)).driver_connection
        return await node.driver.fetch_value(raw, sql, seconds)


async def raw_connection(conn: AsyncConnection) -> Any:
    """The pooled DBAPI connection under ``conn``, without a greenlet hop when it is
    already there (it is, right after checkout)."""
    sync = conn.sync_connection
    if sync is not None and not sync.invalidated and not sync.closed:
        return sync.connection
    return await conn.get_raw_connection()


async def abort(node: Node, conn: AsyncConnection | AsyncSession) -> None:
    """Drop the connection under ``conn`` at once (its server may be frozen), then let
    SQLAlchemy invalidate it; never raises."""
    try:
        if isinstance(conn, AsyncSession):
            conn = await conn.connection()
        node.driver.abort(await conn.get_raw_connection())
        await conn.invalidate()
    except Exception:
        logger.debug("dropping a failed connection failed", exc_info=True)


async def _invalidate(node: Node, sync: Connection | None, raw: Any, exc: BaseException) -> None:
    """Drop a connection that failed, and mark the rest of its pool as suspect."""
    try:
        with contextlib.suppress(Exception):
            node.driver.abort(raw)  # no 2 s goodbye to a server that may be frozen
        pool = node.engine.sync_engine.pool
        invalidate_pool = getattr(pool, "_invalidate", None)
        if (
            invalidate_pool is not None
            and isinstance(exc, Exception)
            and is_connection_error(exc, during_checkout=True)
        ):
            # As SQLAlchemy does on a disconnect: every older pooled connection is
            # replaced at its next checkout.
            invalidate_pool(raw, exc)
            return
        if sync is not None:
            await greenlet_spawn(sync.invalidate, exc if isinstance(exc, Exception) else None)
    except Exception:
        logger.debug("invalidating a failed connection failed", exc_info=True)


async def close_session(node: Node, session: AsyncSession) -> None:
    """Close a session, without a greenlet when it can be done without one.

    ``AsyncSession.close`` runs the ORM's close in a new greenlet, and each greenlet
    maps (and later unmaps) a fresh frame stack for Python: a page fault and two
    system calls, about 10 us here. When the session holds no transaction (a writer
    after its commit), or one plain transaction whose rollback the driver sends
    itself and whose connection the pool keeps, the ORM's close has no I/O left and
    runs as it is. Anything else (a savepoint, a pool that would close the
    connection, psycopg) takes ``AsyncSession.close``.
    """
    sync = session.sync_session
    transaction = sync.get_transaction()
    if transaction is not None:
        sole = _sole_connection(transaction)
        if sole is None:
            await close_quietly(session)
            return
        fairy, queue = sole
        try:
            sent = await node.driver.rollback(fairy)
        except BaseException as exc:
            _drop(node, fairy, sync)
            if isinstance(exc, Exception):
                logger.debug("rolling back a session failed; its connection dropped", exc_info=True)
                return
            raise  # cancelled: the connection was dropped all the same
        if not sent:
            await close_quietly(session)
            return
        if not queue.takes_without_closing():
            # Other sessions ran meanwhile and filled the pool: closing this
            # connection is I/O.
            await close_quietly(session)
            return
    try:
        sync.close()
    except MissingGreenlet:  # pragma: no cover - I/O that _sole_connection missed
        logger.warning("closing a session needed I/O after all", exc_info=True)
        await close_quietly(session)
    except Exception:
        logger.debug("closing a session failed", exc_info=True)


def _drop(node: Node, fairy: Any, sync: Session) -> None:
    """Drop a connection whose rollback failed or was cancelled half-way, and close
    its session; outside a greenlet SQLAlchemy's invalidation closes it without I/O."""
    with contextlib.suppress(Exception):
        node.driver.abort(fairy)
    with contextlib.suppress(Exception):
        fairy.invalidate()
    with contextlib.suppress(Exception):
        sync.close()


def _checkout_without_io(node: Node, session: Session) -> bool | HandOffQueue[Any]:
    """Whether SQLAlchemy's checkout of a connection for ``session`` awaits nothing:
    an idle pooled connection that needs no reconnect (recycled or invalidated), no
    pre-ping, and no listener that might run a statement (the pool's ``checkout``, the
    engine's ``engine_connect`` or ``begin``, the session's ``after_begin``). The
    pool's queue instead when every connection is out: a returned one can be waited
    for outside the greenlet (:func:`_take_turn`)."""
    if not node.driver.checkout_without_io:  # the session is new: not in a transaction
        return False
    bind = session.bind
    pool = getattr(bind, "pool", None)
    queue = getattr(pool, "_pool", None)
    if bind is None or pool is None or not isinstance(queue, HandOffQueue):
        return False
    record = queue.peek()
    if record is None:
        return queue if queue.at_capacity(pool) else False
    if record.dbapi_connection is None or pool._pre_ping or pool.dispatch.checkout:
        return False
    started = record.starttime
    recycle = pool._recycle
    if (
        (recycle > -1 and time.time() - started > recycle)
        or pool._invalidate_time > started
        or record._soft_invalidate_time > started
    ):
        return False
    dispatch = bind.dispatch
    return not (dispatch.engine_connect or dispatch.begin or session.dispatch.after_begin)


async def _take_turn(queue: HandOffQueue[Any], node: Node) -> None:
    """Wait for a returned connection, first come, first served, within the pool's
    timeout; SQLAlchemy's own error when it is over, as its checkout would raise."""
    pool = node.engine.sync_engine.pool
    assert isinstance(pool, QueuePool)  # a HandOffQueue is a QueuePool's (at_capacity)
    seconds = pool.timeout()
    try:
        await queue.take_turn(seconds)
    except sa_queue.Empty:
        raise sa_exc.TimeoutError(
            f"QueuePool limit of size {pool.size()} overflow {pool.overflow()} "
            f"reached, connection timed out, timeout {seconds:0.2f}",
            code="3o7r",
        ) from None


def _sole_connection(transaction: SessionTransaction) -> tuple[Any, HandOffQueue[Any]] | None:
    """The pooled connection of a session transaction whose close needs no I/O once
    its rollback was sent, if its pool keeps it then (asked after the rollback: other
    sessions may fill the pool meanwhile), and that pool's queue; or None."""
    connections = getattr(transaction, "_connections", None)
    # One connection is two entries, keyed by its engine and by itself.
    if transaction.nested or transaction.parent is not None or connections is None:
        return None
    if len(connections) != 2:
        return None
    first, second = connections.values()
    if first is not second:
        return None
    conn, _, _, autoclose = first
    if not autoclose or conn.closed or conn.invalidated or conn.in_nested_transaction():
        return None
    queue = getattr(conn.engine.pool, "_pool", None)
    if not isinstance(queue, HandOffQueue):
        return None
    return conn.connection, queue


async def close_quietly(session: AsyncSession) -> None:
    """Close a session; a connection that is already gone was invalidated by the pool."""
    try:
        await session.close()
    except Exception:
        logger.debug("closing a session failed", exc_info=True)
