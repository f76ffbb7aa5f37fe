"""The router: owns the nodes, hands out writer and reader sessions."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from ._exceptions import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    NoHealthyNodeError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    RetryExhaustedError,
)
from ._health import HealthChecker, update_eligibility
from ._nodes import Node, NodeState, Role, mask_url
from ._retry import NODE_DOWN, ErrorKind, classify, is_connection_error
from ._selection import Selector, make_selector
from ._settings import ENV_PREFIX, RouterSettings, parse_url, split_replica_options
from ._status import NodeStatus, RouterStatus

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI

__all__ = ["IsolationLevel", "ReplicaRouter"]

T = TypeVar("T")
IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]

logger = logging.getLogger("replica_router")

# Checkout failures worth another attempt: the node is down or momentarily full.
_RETRY_AT_CHECKOUT = NODE_DOWN | {ErrorKind.TOO_MANY_CONNECTIONS}


class _CheckoutFailed(Exception):
    """One checkout attempt failed in a way worth another attempt."""

    def __init__(self, node: Node, error: BaseException) -> None:
        super().__init__(node.name)
        self.node = node
        self.error = error


class ReplicaRouter:
    """Read/write splitting over one primary and any number of streaming replicas.

    Args:
        primary_url: the primary (``postgresql+asyncpg://``; ``postgresql://`` and
            ``postgres://`` mean asyncpg too). May list several hosts with
            ``?host=h1:5432&host=h2:5432&target_session_attrs=read-write``.
        replica_urls: the replicas; ``replica_name`` and ``replica_weight`` query
            parameters name and weigh one.
        settings: tuning; defaults when omitted (the environment is read only by
            :meth:`from_env`).
        engine_options: passed to every node's ``create_async_engine`` (pool sizing,
            ``connect_args``, ``pool_recycle``, JSON serializers, ...); they win over
            the settings.
        session_options: passed to every node's ``async_sessionmaker`` (``class_``,
            ``autoflush``, ``info``, ...).

    Example::

        router = ReplicaRouter.from_env()
        app = FastAPI(lifespan=router.lifespan)

        @app.get("/notes/{note_id}")
        async def read(note_id: int, db: AsyncSession = Depends(router.reader)): ...
    """

    __slots__ = (
        "__weakref__",
        "_background",
        "_fallback_cap",
        "_fallback_in_flight",
        "_health",
        "_isolated",
        "_selector",
        "_started",
        "primary",
        "reader",
        "replicas",
        "settings",
        "writer",
    )

    def __init__(
        self,
        primary_url: str | URL,
        replica_urls: Sequence[str | URL] = (),
        *,
        settings: RouterSettings | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(replica_urls, str | URL):
            raise ConfigurationError("replica_urls must be a sequence of URLs, not one URL")
        self.settings = settings if settings is not None else RouterSettings.defaults()
        engine_options = dict(engine_options or {})
        session_options = dict(session_options or {})
        url = parse_url(primary_url, what="primary_url")
        self.primary = self._make_node(
            "primary", Role.PRIMARY, url, 1.0, engine_options, session_options
        )
        replicas: list[Node] = []
        for index, raw in enumerate(replica_urls, start=1):
            what = f"replica_urls[{index - 1}]"
            url, name, weight = split_replica_options(parse_url(raw, what=what), what=what)
            replicas.append(
                self._make_node(
                    name or f"replica-{index}",
                    Role.REPLICA,
                    url,
                    weight,
                    engine_options,
                    session_options,
                )
            )
        names = [self.primary.name, *(r.name for r in replicas)]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"node names must be unique, got {names}")
        self.replicas: tuple[Node, ...] = tuple(replicas)
        self._selector: Selector = make_selector(self.settings.strategy)
        cap = self.settings.fallback_max_in_flight
        if cap is None:
            pool = engine_options.get("pool_size", self.settings.pool_size) + engine_options.get(
                "max_overflow", self.settings.max_overflow
            )
            cap = max(1, pool // 2)
        self._fallback_cap: int = cap
        self._fallback_in_flight = 0
        connect_args = dict(engine_options.get("connect_args", {}))
        self._health = HealthChecker(
            self.primary,
            self.replicas,
            self.settings,
            connect_args=connect_args,
            on_primary_demoted=self._primary_demoted,
        )
        self._started = False
        self._isolated: dict[str, async_sessionmaker[AsyncSession]] = {}
        self._background: set[asyncio.Task[None]] = set()
        from .fastapi import (
            make_dependencies,
        )  # fastapi is a dependency; keep it out of import time

        self.writer, self.reader = make_dependencies(self)

    @classmethod
    def from_env(
        cls,
        *,
        env_prefix: str = ENV_PREFIX,
        env_file: str | None = ".env",
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> ReplicaRouter:
        """A router configured by ``REPLICA_ROUTER_*`` variables (and a ``.env`` file).

        Raises:
            ConfigurationError: a variable is missing or malformed; the message names it.
        """
        settings = RouterSettings(_env_prefix=env_prefix, _env_file=env_file)
        if settings.primary_url is None:
            raise ConfigurationError(
                f"{env_prefix}PRIMARY_URL is not set; expected the primary's URL, "
                "like postgresql+asyncpg://user:password@host:5432/database"
            )
        return cls(
            settings.primary_url,
            settings.replica_urls,
            settings=settings,
            engine_options=engine_options,
            session_options=session_options,
        )

    def _make_node(
        self,
        name: str,
        role: Role,
        url: URL,
        weight: float,
        engine_options: Mapping[str, Any],
        session_options: Mapping[str, Any],
    ) -> Node:
        s = self.settings
        options: dict[str, Any] = {
            "pool_size": s.pool_size,
            "max_overflow": s.max_overflow,
            "pool_timeout": s.pool_timeout,
            "pool_recycle": s.pool_recycle,
            **engine_options,
        }
        connect_args = dict(options.get("connect_args", {}))
        connect_args.setdefault("timeout", s.connect_timeout)
        connect_args["server_settings"] = {
            "application_name": "replica-router",
            **connect_args.get("server_settings", {}),
        }
        options["connect_args"] = connect_args
        if role is Role.REPLICA:
            # A replica that turns out to be writable must still refuse writes.
            options["execution_options"] = {
                **options.get("execution_options", {}),
                "postgresql_readonly": True,
            }
        engine = create_async_engine(url, **options)
        session_kwargs: dict[str, Any] = {"expire_on_commit": False, **session_options}
        # A session used after its request (a background task, a stream) must fail
        # loudly instead of silently reconnecting into a leaked transaction.
        session_kwargs["close_resets_only"] = False
        maker = async_sessionmaker(engine, **session_kwargs)
        if role is Role.REPLICA:
            reader_maker = maker
        else:
            readonly = engine.execution_options(postgresql_readonly=True)
            reader_maker = async_sessionmaker(readonly, **session_kwargs)
        return Node(name, role, url, engine, maker, reader_maker, weight, NodeState())

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every node once and start the background health checks."""
        if self._started:
            return
        self._started = True
        await self._health.start()

    async def close(self) -> None:
        """Stop health checks and dispose every engine, each within ``dispose_timeout``."""
        if self._started:
            self._started = False
            await self._health.stop()
        await asyncio.gather(*(self._dispose(node) for node in self.nodes))

    aclose = close

    async def _dispose(self, node: Node) -> None:
        try:
            await asyncio.wait_for(node.engine.dispose(), self.settings.dispose_timeout)
        except TimeoutError:
            # A stopped (SIGSTOP) server never answers the goodbye; do not hang shutdown.
            logger.warning(
                "%s %s did not close within %.1f s",
                node.role.value,
                node.name,
                self.settings.dispose_timeout,
            )
        except Exception:
            logger.warning("closing %s %s failed", node.role.value, node.name, exc_info=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """FastAPI lifespan: ``FastAPI(lifespan=router.lifespan)``."""
        async with self:
            yield

    # -- nodes -----------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The primary, then the replicas."""
        return (self.primary, *self.replicas)

    def _fit_replicas(self) -> list[Node]:
        fit: list[Node] = []
        slow: list[Node] = []
        for node in self.replicas:
            state = node.state
            if not state.up:
                # Without probes nobody would readmit it: retry after one interval.
                if self._health.running or state.down_since is None:
                    continue
                if time.monotonic() - state.down_since < self.settings.health_interval:
                    continue
            if state.in_recovery is False or state.lagging:
                continue
            (slow if state.slow else fit).append(node)
        return fit or slow

    def _pick_reader(self, tried: Sequence[Node]) -> Node:
        candidates = [n for n in self._fit_replicas() if n not in tried]
        if candidates:
            return self._selector.select(candidates)
        if not self.replicas:
            return self.primary
        if not self.settings.fallback_to_primary:
            raise NoHealthyReplicaError(
                "no replica is fit to serve reads and fallback to the primary is off",
                retry_after=self.settings.health_interval,
            )
        if self.primary in tried:
            raise NoHealthyReplicaError(
                "no replica is fit to serve reads and the primary is unreachable",
                retry_after=self.settings.health_interval,
            )
        if self._fallback_in_flight >= self._fallback_cap:
            raise NoHealthyReplicaError(
                f"no replica is fit to serve reads and the primary already serves "
                f"{self._fallback_cap} fallback reads (the cap that protects it)",
                retry_after=self.settings.health_interval,
            )
        logger.debug("no fit replica; reading from the primary")
        return self.primary

    # -- sessions --------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``: full jitter, capped."""
        s = self.settings
        return random.uniform(0, min(s.retry_backoff_max, s.retry_backoff * 2 ** (attempt - 1)))

    def _retrying(self, attempts: int) -> AsyncRetrying:
        s = self.settings

        def wait(state: RetryCallState) -> float:
            # Moving to another node needs no pause; retrying the same one backs off.
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            if isinstance(error, _CheckoutFailed) and error.node.role is Role.REPLICA:
                return 0.0
            return self._backoff(state.attempt_number)

        return AsyncRetrying(
            stop=stop_after_attempt(attempts) | stop_after_delay(s.checkout_timeout),
            wait=wait,
            # Only our own marker: CancelledError and everything else go straight through.
            retry=retry_if_exception(lambda e: isinstance(e, _CheckoutFailed)),
            reraise=True,
        )

    async def _open(self, node: Node, maker: async_sessionmaker[AsyncSession]) -> AsyncSession:
        """A session on ``node`` whose transaction has begun: the connection is proven."""
        session = maker()
        started = time.perf_counter()
        try:
            conn = await session.connection()
            try:
                await asyncio.wait_for(_begin_now(conn), self.settings.connect_timeout)
            except BaseException as exc:
                await _invalidate(conn, exc)
                raise
        except BaseException as exc:
            await _close_quietly(session)
            if isinstance(exc, Exception):
                kind = classify(exc, during_checkout=True)
                if kind in _RETRY_AT_CHECKOUT:
                    self._note_failure(node, exc, kind)
                    raise _CheckoutFailed(node, exc) from exc
            raise
        node.state.observe_latency(time.perf_counter() - started)
        return session

    def _note_failure(self, node: Node, exc: BaseException, kind: ErrorKind) -> None:
        state = node.state
        state.checkout_failures += 1
        if kind in NODE_DOWN:
            message = f"{kind.value}: {type(exc).__name__}"
            if state.mark_down(f"down: {message}", message):
                logger.warning(
                    "%s %s marked down by a request (%s)", node.role.value, node.name, message
                )
                if node.role is Role.REPLICA:
                    update_eligibility(self.replicas, self.settings)

    async def _checkout_reader(self, tried: list[Node]) -> tuple[AsyncSession, Node]:
        async def attempt(number: int) -> tuple[AsyncSession, Node]:
            node = self._pick_reader(tried)
            tried.append(node)
            if number > 1:
                node.state.retries += 1
            return await self._enter(node, node.reader_sessionmaker), node

        try:
            return await self._with_retries(
                attempt, self.settings.checkout_attempts + len(self.replicas)
            )
        except _CheckoutFailed as exc:
            raise NoHealthyReplicaError(
                f"no node could serve a read (last: {exc.node.name}, {type(exc.error).__name__})",
                retry_after=self.settings.health_interval,
            ) from exc.error

    async def _with_retries(self, attempt: Callable[[int], Awaitable[T]], attempts: int) -> T:
        """Run ``attempt(1)``; if it fails with ``_CheckoutFailed``, retry it with tenacity.

        The first attempt skips tenacity entirely: the common path allocates nothing.
        """
        try:
            return await attempt(1)
        except _CheckoutFailed:
            if attempts <= 1:
                raise
        async for retry in self._retrying(attempts - 1):
            with retry:
                return await attempt(retry.retry_state.attempt_number + 1)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _enter(self, node: Node, maker: async_sessionmaker[AsyncSession]) -> AsyncSession:
        node.state.in_flight += 1
        if self._is_fallback(node, maker):
            self._fallback_in_flight += 1
        try:
            return await self._open(node, maker)
        except BaseException:
            self._leave(node, maker)
            raise

    def _is_fallback(self, node: Node, maker: async_sessionmaker[AsyncSession]) -> bool:
        """A read on the primary while replicas are configured: counted against the cap."""
        return node is self.primary and bool(self.replicas) and maker is node.reader_sessionmaker

    def _leave(self, node: Node, maker: async_sessionmaker[AsyncSession]) -> None:
        node.state.in_flight -= 1
        if self._is_fallback(node, maker):
            self._fallback_in_flight -= 1

    async def _checkout_writer(self, maker: async_sessionmaker[AsyncSession]) -> AsyncSession:
        primary = self.primary

        async def attempt(number: int) -> AsyncSession:
            if number > 1:
                primary.state.retries += 1
            session = await self._enter(primary, maker)
            if not primary.state.up:  # a working connection proves it
                primary.state.up = True
                logger.info("primary %s is reachable again", primary.name)
            return session

        try:
            return await self._with_retries(attempt, self.settings.checkout_attempts)
        except _CheckoutFailed as exc:
            raise PrimaryUnavailableError(
                f"the primary is unreachable ({type(exc.error).__name__})",
                retry_after=self.settings.health_interval,
            ) from exc.error

    def reader_session(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A read-only session on a fit replica (or the primary, see fallback).

        The connection is checked out and its transaction begun before this yields,
        so an unreachable replica is skipped before any of your code runs.

        Raises:
            NoHealthyReplicaError: no node could serve the read.
        """
        return self._reader([])

    @asynccontextmanager
    async def _reader(self, tried: list[Node]) -> AsyncIterator[AsyncSession]:
        session, node = await self._checkout_reader(tried)
        node.state.sessions += 1
        try:
            yield session
        except BaseException as exc:
            if node.role is Role.REPLICA and isinstance(exc, Exception):
                kind = classify(exc)
                if kind in NODE_DOWN:
                    self._note_failure(node, exc, kind)
            raise
        finally:
            self._leave(node, node.reader_sessionmaker)
            await _close_quietly(session)

    @asynccontextmanager
    async def writer_session(
        self, *, isolation_level: IsolationLevel | None = None
    ) -> AsyncIterator[AsyncSession]:
        """A session on the primary, committed when the block ends without error.

        An exception in the block rolls back. If the commit fails, the error
        propagates (a FastAPI route answers 500, never 2xx). If the connection is
        lost while COMMIT is in flight, :class:`CommitOutcomeUnknownError` is raised.

        Args:
            isolation_level: e.g. ``"SERIALIZABLE"``; the server default when omitted.

        Raises:
            PrimaryUnavailableError: no working connection to the primary.
            CommitOutcomeUnknownError: COMMIT was sent and its answer lost.
        """
        maker = self._writer_maker(isolation_level)
        session = await self._checkout_writer(maker)
        node = self.primary
        node.state.sessions += 1
        try:
            try:
                yield session
                # Flush first: a failure there is certain (nothing committed).
                await session.flush()
            except Exception as exc:
                if classify(exc) is ErrorKind.READ_ONLY:
                    self._primary_demoted("a write on the primary failed with 25006 (read-only)")
                raise
            try:
                await session.commit()
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorKind.READ_ONLY:
                    self._primary_demoted("COMMIT on the primary failed with 25006 (read-only)")
                if kind in NODE_DOWN:
                    node.state.mark_down("down: connection lost during COMMIT", type(exc).__name__)
                    raise CommitOutcomeUnknownError(
                        "the connection to the primary was lost during COMMIT; the "
                        "transaction may or may not have committed"
                    ) from exc
                raise
        finally:
            self._leave(node, maker)
            await _close_quietly(session)

    def _primary_demoted(self, why: str) -> None:
        """The primary turned read-only: drain its pool so new connections find the
        writable host (a multi-host URL with ``target_session_attrs=read-write``)."""
        state = self.primary.state
        state.failovers += 1
        logger.warning("primary %s is read-only (%s); draining its pool", self.primary.name, why)
        task = asyncio.get_running_loop().create_task(self._dispose(self.primary))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _writer_maker(self, level: IsolationLevel | None) -> async_sessionmaker[AsyncSession]:
        maker = self.primary.sessionmaker
        if level is None:
            return maker
        cached = self._isolated.get(level)
        if cached is None:
            engine = self.primary.engine.execution_options(isolation_level=level)
            options = {k: v for k, v in maker.kw.items() if k != "bind"}
            cached = self._isolated[level] = async_sessionmaker(engine, **options)
        return cached

    async def run_read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run ``fn(session)`` on a reader; re-run it elsewhere if the node fails.

        ``fn`` must be a whole read that is safe to repeat. After a lost connection
        or a recovery conflict on a replica (40001, 40P01), it runs again on another
        node (the primary last, if allowed); any other error propagates at once.

        Raises:
            NoHealthyReplicaError: no node is left to try.
            RetryExhaustedError: every attempt failed; ``last_exception`` says why.
        """
        tried: list[Node] = []
        attempts = self.settings.checkout_attempts + len(self.replicas)
        for attempt in range(1, attempts + 1):
            before = len(tried)
            try:
                async with self._reader(tried) as session:
                    return await fn(session)
            except NoHealthyNodeError:
                raise  # the checkout already tried every node it could
            except Exception as exc:
                kind = classify(exc)
                node = tried[-1] if len(tried) > before else None
                retryable = kind in NODE_DOWN or (
                    node is not None
                    and node.role is Role.REPLICA
                    and kind in (ErrorKind.SERIALIZATION, ErrorKind.DEADLOCK)
                )
                if not retryable or node is None:
                    raise
                node.state.retries += 1
                logger.info(
                    "read on %s failed (%s); running it again elsewhere", node.name, kind.value
                )
                if attempt == attempts:
                    raise RetryExhaustedError(
                        f"the read failed on every node tried ({kind.value})",
                        last_exception=exc,
                        attempts=attempt,
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def run_write(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        *,
        isolation_level: IsolationLevel | None = None,
        attempts: int | None = None,
    ) -> T:
        """Run ``fn(session)`` in a primary transaction and commit it; re-run when safe.

        It runs again only when the transaction certainly did not commit: after a
        serialization failure (40001) or a deadlock (40P01), or a connection lost
        before COMMIT was sent. If the connection is lost during COMMIT,
        :class:`CommitOutcomeUnknownError` propagates and ``fn`` never runs again.

        Args:
            fn: the unit of work; it may run more than once, so it must not have
                effects outside the transaction.
            isolation_level: e.g. ``"SERIALIZABLE"``.
            attempts: the most runs (default: ``checkout_attempts`` + 2).

        Raises:
            CommitOutcomeUnknownError: the outcome of COMMIT is unknown.
            RetryExhaustedError: every attempt failed; ``last_exception`` says why.
        """
        limit = attempts if attempts is not None else self.settings.checkout_attempts + 2
        for attempt in range(1, limit + 1):
            try:
                async with self.writer_session(isolation_level=isolation_level) as session:
                    return await fn(session)
            except (CommitOutcomeUnknownError, NoHealthyNodeError):
                # Unknown outcome: never again. No node: the checkout already retried.
                raise
            except Exception as exc:
                kind = classify(exc)
                if (
                    kind not in (ErrorKind.SERIALIZATION, ErrorKind.DEADLOCK)
                    and kind not in NODE_DOWN
                ):
                    raise
                self.primary.state.retries += 1
                if attempt == limit:
                    raise RetryExhaustedError(
                        f"the transaction failed {attempt} times ({kind.value})",
                        last_exception=exc,
                        attempts=attempt,
                    ) from exc
                logger.info("transaction rolled back (%s); running it again", kind.value)
                await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- status ----------------------------------------------------------------------

    def status(self) -> RouterStatus:
        """A snapshot of every node; URLs are masked."""
        return RouterStatus(
            nodes=tuple(_node_status(n) for n in self.nodes),
            fallback_in_flight=self._fallback_in_flight,
            fallback_cap=self._fallback_cap,
            strategy=self.settings.strategy,
            health_checks_running=self._health.running,
        )

    def health_routes(self, prefix: str = "/health") -> APIRouter:
        """An ``APIRouter`` with ``{prefix}/live`` and ``{prefix}/nodes``; mount it."""
        from .fastapi import health_routes

        return health_routes(self, prefix)

    def __repr__(self) -> str:
        return (
            f"<ReplicaRouter primary={mask_url(self.primary.url)} "
            f"replicas={[mask_url(r.url) for r in self.replicas]}>"
        )


def _node_status(node: Node) -> NodeStatus:
    s = node.state
    fit = s.up and (node.role is Role.PRIMARY or (s.in_recovery is not False and not s.lagging))
    return NodeStatus(
        name=node.name,
        role=node.role.value,
        server_role=None if s.in_recovery is None else ("replica" if s.in_recovery else "primary"),
        url=mask_url(node.url),
        healthy=fit,
        reason=s.reason,
        lag_seconds=s.lag_seconds,
        lag_bytes=s.lag_bytes,
        in_flight=s.in_flight,
        latency_ms=None if s.latency is None else round(s.latency * 1000, 3),
        last_error=s.last_error,
        server_version=s.server_version,
        sessions=s.sessions,
        checkout_failures=s.checkout_failures,
        ejections=s.ejections,
        retries=s.retries,
        failovers=s.failovers,
        weight=node.weight,
    )


async def _begin_now(conn: Any) -> None:
    """Send the transaction's BEGIN now rather than with the first statement.

    asyncpg's adapter in SQLAlchemy begins lazily; sending BEGIN here proves the
    pooled connection works without an extra round trip (a ping would add one).
    """
    raw = await conn.get_raw_connection()
    adapted = raw.dbapi_connection
    start = getattr(adapted, "_start_transaction", None)
    if start is None:  # another driver adapter: fall back to a real statement
        await conn.exec_driver_sql("SELECT 1")
        return
    if getattr(adapted, "_started", None) is True:  # SQLAlchemy 2.0
        return
    if (
        getattr(adapted, "_started", None) is None
        and getattr(adapted, "_transaction", None) is not None
    ):
        return
    await start()


async def _invalidate(conn: Any, exc: BaseException) -> None:
    """Drop a connection that failed, and mark the rest of its pool as suspect."""
    try:
        raw = await conn.get_raw_connection()
        pool = conn.sync_engine.pool
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
        await conn.invalidate(exc if isinstance(exc, Exception) else None)
    except Exception:
        logger.debug("invalidating a failed connection failed", exc_info=True)


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception:
        # The connection is already gone; the pool has invalidated it.
        logger.debug("closing a session failed", exc_info=True)
