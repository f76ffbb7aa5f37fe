"""Writes: the writer session, what its COMMIT means, the commit's WAL position, demotion.

A writer session commits when its block ends without error, and the outcome is
told apart: a failure while flushing is certain (nothing was committed), a
connection lost while COMMIT was in flight is :class:`CommitOutcomeUnknownError`.
After a commit of a transaction that ran statements, the pool's ``reset`` hook
reads the primary's WAL position on the same connection, before anyone else can
have it, for read-your-writes. A primary that turned read-only (25006, or a probe
that found it in recovery) has its pool drained so that a multi-host URL finds the
new primary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.util import concurrency as _concurrency

from ._checkout import Checkout, CheckoutFailed
from ._consistency import WAL_INSERT_LSN_SQL, ConsistencyState, PrimaryPosition, current_state
from ._exceptions import CommitNotSentError, CommitOutcomeUnknownError, PrimaryUnavailableError
from ._nodes import Node, Topology, dispose_node
from ._retry import NODE_DOWN, ErrorKind, classify, never_sent, sqlstate_of
from ._settings import RouterSettings
from ._tracing import CheckoutSpan

__all__ = ["IsolationLevel", "Writes"]

IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]

logger = logging.getLogger("replica_router")

# Set on a primary connection by any statement, and at COMMIT if statements ran;
# read (and cleared) when the connection goes back to the pool, to know whether the
# transaction's WAL position is worth a round trip.
_RAN_STATEMENTS = "replica_router.ran_statements"
_COMMITTED = "replica_router.committed"
_await: Callable[[Awaitable[Any]], Any] = (
    getattr(_concurrency, "await_", None) or _concurrency.await_only
)


class Writes:
    """Writer sessions on the topology's primary.

    Args:
        topology: the nodes (its primary takes the writes).
        settings: read-your-writes mode, timeouts, retry bounds.
        checkout: opens proven sessions.
        position: where commits' WAL positions go.
    """

    __slots__ = ("_background", "_checkout", "_isolated", "_position", "_settings", "_topology")

    def __init__(
        self,
        topology: Topology,
        settings: RouterSettings,
        checkout: Checkout,
        position: PrimaryPosition,
    ) -> None:
        self._topology = topology
        self._settings = settings
        self._checkout = checkout
        self._position = position
        self._isolated: dict[str, async_sessionmaker[AsyncSession]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._watch(topology.primary)

    def _watch(self, primary: Node) -> None:
        """Follow every transaction on the primary: whether it ran a statement, whether
        it committed, and the pool's ``reset`` when its connection goes back.

        Dialect events and the dialect's own ``do_commit``, not connection events
        (``before_cursor_execute``, ``commit``): one connection event listener makes
        SQLAlchemy dispatch every connection event of every connect, statement and
        commit on that engine (about 200 more Python calls per write, measured)."""
        engine = primary.engine.sync_engine
        for name in ("do_execute", "do_execute_no_params", "do_executemany"):
            event.listen(engine, name, _ran_statement)
        dialect = engine.dialect
        do_commit = dialect.do_commit

        def commit(dbapi_connection: Any) -> None:
            do_commit(dbapi_connection)
            info = dbapi_connection.info
            if info.get(_RAN_STATEMENTS):
                info[_COMMITTED] = True

        dialect.do_commit = commit  # type: ignore[method-assign]
        event.listen(engine, "reset", self._on_reset)

    @asynccontextmanager
    async def session(self, isolation_level: IsolationLevel | None) -> AsyncIterator[AsyncSession]:
        """A session on the primary, committed when the block ends without error."""
        node = self._topology.primary
        trace = self._checkout.trace
        if trace is None:
            session = await self._checkout_writer(node, self._maker(node, isolation_level))
        else:
            with trace.writer(node) as span:
                session = await self._checkout_writer(
                    node, self._maker(node, isolation_level), span
                )
        node.state.sessions += 1
        # The pool's reset hook (_on_reset) records this commit's WAL position here.
        state = current_state(create=True) if self._settings.read_your_writes != "off" else None
        committing = False

        def flush_then_commit(sync_session: Session) -> None:
            # One greenlet hop for both; a failure while flushing is certain (nothing
            # was committed), one during COMMIT may not be.
            nonlocal committing
            sync_session.flush()
            committing = True
            sync_session.commit()

        try:
            try:
                yield session
                trace = self._checkout.trace
                if trace is None:
                    await session.run_sync(flush_then_commit)
                else:
                    with trace.commit(node):
                        await session.run_sync(flush_then_commit)
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorKind.READ_ONLY:
                    self.primary_demoted("a write on the primary failed with 25006 (read-only)")
                # 25P03: the server ended the idle transaction before it read COMMIT.
                if committing and (never_sent(exc) or sqlstate_of(exc) == "25P03"):
                    node.state.mark_down("down: connection lost before COMMIT", type(exc).__name__)
                    raise CommitNotSentError(
                        "COMMIT never reached the primary (the connection was already "
                        "broken): the transaction was not committed"
                    ) from exc
                if committing and (kind in NODE_DOWN or kind is ErrorKind.TIMEOUT):
                    node.state.mark_down("down: connection lost during COMMIT", type(exc).__name__)
                    raise CommitOutcomeUnknownError(
                        "the connection to the primary was lost during COMMIT; the "
                        "transaction may or may not have committed"
                    ) from exc
                raise
            if state is not None:
                await self._after_commit(state)
        finally:
            await self._checkout.release(node, session)

    async def _checkout_writer(
        self,
        primary: Node,
        maker: async_sessionmaker[AsyncSession],
        span: CheckoutSpan | None = None,
    ) -> AsyncSession:
        async def attempt(number: int) -> AsyncSession:
            if number > 1:
                primary.state.retries += 1
            session, _ = await self._checkout.open(primary, maker, None, span)
            if span is not None:
                span.chosen(primary, "primary")
            if not primary.state.up:  # a working connection proves it
                primary.state.up = True
                logger.info("primary %s is reachable again", primary.name)
            return session

        try:
            return await self._checkout.with_retries(attempt, self._settings.checkout_attempts)
        except CheckoutFailed as exc:
            raise PrimaryUnavailableError(
                f"the primary {exc.summary}",
                retry_after=self._settings.health_interval,
            ) from exc.error

    def _maker(
        self, primary: Node, level: IsolationLevel | None
    ) -> async_sessionmaker[AsyncSession]:
        maker = primary.sessionmaker
        if level is None:
            return maker
        cached = self._isolated.get(level)
        if cached is None:
            engine = primary.engine.execution_options(isolation_level=level)
            options = {k: v for k, v in maker.kw.items() if k != "bind"}
            cached = self._isolated[level] = async_sessionmaker(engine, **options)
        return cached

    def _on_reset(self, dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        """Pool ``reset`` on the primary: a connection goes back after its transaction.

        If that transaction ran statements and committed, read the WAL position on
        this connection before anyone else can have it (one round trip, no BEGIN),
        for the request or task that committed (contextvars reach SQLAlchemy's
        greenlet). It runs inside the greenlet of the COMMIT, so it may await.
        """
        info = record.info
        info.pop(_RAN_STATEMENTS, None)
        if not info.pop(_COMMITTED, False):
            return
        state = current_state()
        if state is None:
            return
        state.wrote = True
        if self._settings.read_your_writes != "lsn":
            return
        if reset_state.terminate_only or not reset_state.asyncio_safe:
            state.lsn_missing = True
            return
        driver = self._topology.primary.driver
        try:
            lsn = _await(
                driver.fetch_value(
                    record.driver_connection, WAL_INSERT_LSN_SQL, self._settings.connect_timeout
                )
            )
        except Exception:
            logger.debug("reading the WAL position after COMMIT failed", exc_info=True)
            state.lsn_missing = True
            return
        if lsn is not None and int(lsn) > state.own_lsn:
            state.own_lsn = int(lsn)

    async def _after_commit(self, state: ConsistencyState) -> None:
        """After a writer committed: fill in a position the reset hook could not read,
        and let replica lag be measured against it too."""
        if state.lsn_missing:
            state.lsn_missing = False
            # Any position read after COMMIT returned covers the commit.
            lsn = await self._position.current()
            if lsn is None:
                logger.warning(
                    "committed, but the primary's WAL position could not be read; later "
                    "reads of this client may not see this write"
                )
                return
            state.own_lsn = max(state.own_lsn, lsn)
        self._position.committed(state.own_lsn)

    def primary_demoted(self, why: str) -> None:
        """The primary turned read-only: drain its pool so new connections find the
        writable host (a multi-host URL with ``target_session_attrs=read-write``)."""
        primary = self._topology.primary
        # Counted as a failover by the health checker once it finds the new host.
        logger.warning("primary %s is read-only (%s); draining its pool", primary.name, why)
        task = asyncio.get_running_loop().create_task(
            dispose_node(primary, self._settings.dispose_timeout)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _ran_statement(cursor: Any, statement: str, *args: Any) -> None:
    """``do_execute`` (and friends) on the primary: this transaction ran something.
    Returns None: SQLAlchemy still runs the statement itself."""
    # Not contextlib.suppress: this runs for every statement on the primary.
    try:  # noqa: SIM105
        args[-1].root_connection.info[_RAN_STATEMENTS] = True
    except NotImplementedError:
        pass  # the dialect's own checks on a first connect: no pool entry, no transaction
