"""The router: owns the nodes, hands out writer and reader sessions."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import concurrency as _concurrency
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from ._consistency import (
    ConsistencyState,
    ReadPolicy,
    ReadYourWrites,
    ReadYourWritesMiddleware,
    TokenCodec,
    current_state,
)
from ._exceptions import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConsistencyTimeoutError,
    NoHealthyNodeError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    RetryExhaustedError,
)
from ._health import HealthChecker, update_eligibility
from ._nodes import Node, NodeState, Role, mask_url
from ._pool import FairAsyncQueuePool
from ._retry import NODE_DOWN, ErrorKind, classify, is_connection_error
from ._selection import Selector, make_selector
from ._settings import ENV_PREFIX, RouterSettings, parse_url, split_replica_options
from ._status import NodeStatus, ReadPolicyStatus, RouterStatus

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI

    from .fastapi import ReaderDependency

__all__ = ["IsolationLevel", "ReplicaRouter"]

T = TypeVar("T")
IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]

logger = logging.getLogger("replica_router")

# Checkout failures worth another attempt: the node is down or momentarily full.
_RETRY_AT_CHECKOUT = NODE_DOWN | {ErrorKind.TOO_MANY_CONNECTIONS}
# Set on a primary connection by any statement, and at COMMIT if statements ran;
# read (and cleared) when the connection goes back to the pool, to know whether the
# transaction's WAL position is worth a round trip.
_RAN_STATEMENTS = "replica_router.ran_statements"
_COMMITTED = "replica_router.committed"
_await: Callable[[Awaitable[Any]], Any] = (
    getattr(_concurrency, "await_", None) or _concurrency.await_only
)
_WAL_INSERT_LSN = "SELECT pg_current_wal_insert_lsn()"
_REPLAY_LSN = "SELECT pg_last_wal_replay_lsn()"


class _CheckoutFailed(Exception):
    """One checkout attempt failed in a way worth another attempt."""

    def __init__(self, node: Node, error: BaseException) -> None:
        super().__init__(node.name)
        self.node = node
        self.error = error


class _Behind(Exception):
    """No replica replayed the position a read needs within the wait bound."""


class _Check(enum.Enum):
    """How a read checks that a replica replayed the client's position."""

    NO = 0  # known from a probe or an earlier check
    ONCE = 1  # re-read it; if behind, try another replica
    WAIT = 2  # re-read it until it catches up or consistency_wait is over


# A replica found behind is not asked again for this long (it is known behind).
_RECHECK_AFTER = 0.05


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
        "_codec",
        "_default_policy",
        "_fallback_cap",
        "_fallback_in_flight",
        "_health",
        "_isolated",
        "_policies",
        "_primary_lsn_refresh",
        "_reader_dependencies",
        "_selector",
        "_started",
        "_written_lsn",
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
        secret = self.settings.lsn_secret
        self._codec = TokenCodec(secret.get_secret_value().encode() if secret else None)
        self._default_policy = ReadPolicy("default", self.settings.read_your_writes)
        self._policies: dict[tuple[str | None, float | None], ReadPolicy] = {
            (None, None): self._default_policy
        }
        self._reader_dependencies: dict[ReadPolicy, ReaderDependency] = {}
        self._primary_lsn_refresh: asyncio.Future[int | None] | None = None
        self._written_lsn = 0
        primary_engine = self.primary.engine.sync_engine
        event.listen(primary_engine, "before_cursor_execute", _ran_statement)
        event.listen(primary_engine, "commit", _committing)
        event.listen(primary_engine, "reset", self._on_reset)
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
        options: dict[str, Any] = {"pool_recycle": s.pool_recycle}
        poolclass = engine_options.get("poolclass", FairAsyncQueuePool)
        if issubclass(poolclass, QueuePool):
            # Sizing applies to queue pools only (NullPool and friends refuse it).
            options.update(
                pool_size=s.pool_size, max_overflow=s.max_overflow, pool_timeout=s.pool_timeout
            )
        options.update(engine_options, poolclass=poolclass)
        connect_args = dict(options.get("connect_args", {}))
        connect_args.setdefault("timeout", s.connect_timeout)
        connect_args["server_settings"] = {
            "application_name": "replica-router",
            **connect_args.get("server_settings", {}),
        }
        options["connect_args"] = connect_args
        engine = create_async_engine(url, **options)
        if role is Role.REPLICA:
            # A replica that turns out to be writable must still refuse writes: every
            # transaction is READ ONLY. Set once per connection on asyncpg's adapter;
            # the equivalent execution option costs about 50 us per checkout.
            event.listen(engine.sync_engine, "connect", _read_only_connection)
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
        """FastAPI lifespan: ``FastAPI(lifespan=router.lifespan)``.

        Also puts :class:`ReadYourWritesMiddleware` around the app (unless it was
        added already), so positions travel with clients.
        """
        self.install_middleware(app)
        async with self:
            yield

    def install_middleware(self, app: Any) -> None:
        """Wrap a started Starlette/FastAPI app in :class:`ReadYourWritesMiddleware`.

        ``app.add_middleware`` is refused once an app has started, so the lifespan
        wraps the app's built middleware stack instead. Does nothing when the
        middleware is there already or read-your-writes is off.
        """
        if self.settings.read_your_writes == "off":
            return
        added = getattr(app, "user_middleware", ())
        if any(getattr(m, "cls", None) is ReadYourWritesMiddleware for m in added):
            return
        if not hasattr(app, "middleware_stack") or not hasattr(app, "build_middleware_stack"):
            logger.warning(
                "cannot install ReadYourWritesMiddleware on %r; wrap the app in it",
                type(app).__name__,
            )
            return
        stack = app.middleware_stack
        if isinstance(stack, ReadYourWritesMiddleware):
            return
        if stack is None:  # the lifespan was run by hand (a test), not by the app
            stack = app.build_middleware_stack()
        app.middleware_stack = ReadYourWritesMiddleware(stack, self)

    # -- nodes -----------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The primary, then the replicas."""
        return (self.primary, *self.replicas)

    def _fit_replicas(self, max_lag: float | None = None) -> list[Node]:
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
            if state.in_recovery is False:
                continue
            if max_lag is None:
                if state.lagging:
                    continue
            elif (state.lag_seconds or 0.0) > max_lag:
                continue
            (slow if state.slow else fit).append(node)
        return fit or slow

    def _pick_reader(
        self, tried: Sequence[Node], max_lag: float | None, need: int
    ) -> tuple[Node, _Check]:
        """The node for the next read attempt, and how its position must be checked.

        With ``need`` (a WAL position): the selector picks among replicas known to
        have replayed it and those not checked for a while (which are checked, not
        waited for). If none is known to have it, the most advanced replica is
        checked and waited for.
        """
        candidates = [n for n in self._fit_replicas(max_lag) if n not in tried]
        if candidates:
            if not need:
                return self._selector.select(candidates), _Check.NO
            ready: list[Node] = []
            unknown: list[Node] = []
            recheck_before = time.monotonic() - _RECHECK_AFTER
            for node in candidates:
                if (node.state.replay_lsn or 0) >= need:
                    ready.append(node)
                elif node.state.replay_checked_at < recheck_before:
                    unknown.append(node)
            if ready:
                choice = self._selector.select(ready + unknown)
                return choice, _Check.NO if choice in ready else _Check.ONCE
            # Wait on the most advanced replica, or on one not checked lately: the
            # replica just waited on would otherwise always look the most advanced.
            best = max(candidates, key=lambda n: n.state.replay_lsn or 0)
            if best not in unknown:
                unknown.append(best)
            return self._selector.select(unknown), _Check.WAIT
        if not self.replicas:
            return self.primary, _Check.NO
        return self._primary_for_reads(tried, "no replica is fit to serve reads"), _Check.NO

    def _primary_for_reads(self, tried: Sequence[Node], why: str) -> Node:
        """The primary as a reader, if the settings and the fallback cap allow it."""
        if not self.settings.fallback_to_primary:
            raise NoHealthyReplicaError(
                f"{why} and fallback to the primary is off",
                retry_after=self.settings.health_interval,
            )
        if self.primary in tried:
            raise NoHealthyReplicaError(
                f"{why} and the primary is unreachable",
                retry_after=self.settings.health_interval,
            )
        if self._fallback_in_flight >= self._fallback_cap:
            raise NoHealthyReplicaError(
                f"{why} and the primary already serves {self._fallback_cap} reads "
                "(the cap that protects it)",
                retry_after=self.settings.health_interval,
            )
        logger.debug("%s; reading from the primary", why)
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

    async def _open(
        self,
        node: Node,
        maker: async_sessionmaker[AsyncSession],
        *,
        need: int = 0,
        wait: bool = False,
    ) -> tuple[AsyncSession, str]:
        """A session on ``node`` whose connection is proven, and how it was decided.

        Args:
            need: a WAL position the node must have replayed; it is re-read before
                the transaction begins.
            wait: wait for ``need`` up to ``consistency_wait``.

        Raises:
            _Behind: the replica did not replay ``need`` in time.
        """
        session = maker()
        started = time.perf_counter()
        decision = "replica"
        try:
            conn = await session.connection()
            try:
                if need:
                    # Reading the position proves the connection: BEGIN can stay lazy.
                    decision = await self._await_replay(conn, node, need, wait)
                else:
                    # asyncio.timeout, not wait_for: no extra task per request.
                    async with asyncio.timeout(self.settings.connect_timeout):
                        await _begin_now(conn)
            except _Behind:
                raise
            except BaseException as exc:
                await _invalidate(conn, exc)
                raise
        except BaseException as exc:
            await _close_quietly(session)
            if isinstance(exc, Exception) and not isinstance(exc, _Behind):
                kind = classify(exc, during_checkout=True)
                if kind in _RETRY_AT_CHECKOUT:
                    self._note_failure(node, exc, kind)
                    raise _CheckoutFailed(node, exc) from exc
            raise
        if not need:  # a wait is not the node's latency
            node.state.observe_checkout(time.perf_counter() - started)
        return session, decision

    async def _await_replay(self, conn: AsyncConnection, node: Node, need: int, wait: bool) -> str:
        """Re-read the replica's replay position until it reaches ``need`` or time is up."""
        driver = (await _raw_connection(conn)).driver_connection
        timeout = self.settings.connect_timeout
        state = node.state
        deadline = time.monotonic() + (self.settings.consistency_wait if wait else 0.0)
        pause = 0.002
        waited = False
        while True:
            lsn = await driver.fetchval(_REPLAY_LSN, timeout=timeout)
            if lsn is None:  # not in recovery: a promoted "replica"
                raise _Behind()
            lsn = int(lsn)
            state.replay_checked_at = time.monotonic()
            if lsn > (state.replay_lsn or 0):
                state.replay_lsn = lsn
            if lsn >= need:
                return "replica_after_wait" if waited else "replica_after_check"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Behind()
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.02)
            waited = True

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

    async def _checkout_reader(
        self, tried: list[Node], policy: ReadPolicy, state: ConsistencyState | None
    ) -> tuple[AsyncSession, Node]:
        need = 0
        to_primary: str | None = None
        if state is not None and policy.read_your_writes != "off":
            if policy.read_your_writes == "request":
                if state.wrote:
                    to_primary = "primary_after_write"
            else:
                if state.client_lsn and not state.verified:
                    await self._verify_client_lsn(state, policy)
                need = max(state.client_lsn, state.own_lsn)

        async def attempt(number: int) -> tuple[AsyncSession, Node]:
            nonlocal to_primary
            while True:
                if to_primary is not None:
                    node, check = self._primary_for_consistency(tried, to_primary), _Check.NO
                else:
                    node, check = self._pick_reader(tried, policy.max_lag_seconds, need)
                tried.append(node)
                if number > 1:
                    node.state.retries += 1
                    number = 1  # count a retry once, not per replica found behind
                try:
                    session, decision = await self._enter(
                        node,
                        node.reader_sessionmaker,
                        need=need if check is not _Check.NO else 0,
                        wait=check is _Check.WAIT,
                    )
                except _Behind:
                    # Fit, only behind: skipped for this read (it stays in ``tried``).
                    if check is _Check.WAIT:
                        to_primary = "primary_behind"
                    continue
                if node is self.primary:
                    decision = to_primary or "primary_fallback"
                policy.decisions[decision] += 1
                return session, node

        try:
            return await self._with_retries(
                attempt, self.settings.checkout_attempts + len(self.replicas)
            )
        except _CheckoutFailed as exc:
            raise NoHealthyReplicaError(
                f"no node could serve a read (last: {exc.node.name}, {type(exc.error).__name__})",
                retry_after=self.settings.health_interval,
            ) from exc.error

    def _primary_for_consistency(self, tried: Sequence[Node], decision: str) -> Node:
        why = (
            "this request wrote (read_your_writes=request)"
            if decision == "primary_after_write"
            else f"no replica replayed the client's last write within "
            f"{self.settings.consistency_wait} s"
        )
        if not self.settings.fallback_to_primary:
            raise ConsistencyTimeoutError(
                f"{why}, and fallback to the primary is off",
                retry_after=self.settings.health_interval,
            )
        return self._primary_for_reads(tried, why)

    async def _verify_client_lsn(self, state: ConsistencyState, policy: ReadPolicy) -> None:
        """Check the client's claimed position once: beyond the primary's, it is dropped."""
        state.verified = True
        if state.client_lsn > self._known_primary_lsn():
            current = await self._current_primary_lsn()
            if current is None or state.client_lsn > current:
                # Forged, from another cluster, or not checkable now: never trusted.
                logger.debug("ignoring a client WAL position beyond the primary's")
                state.client_lsn = 0
                policy.decisions["token_ignored"] += 1

    def _known_primary_lsn(self) -> int:
        return max(self._health.primary_lsn or 0, self._written_lsn)

    async def _current_primary_lsn(self) -> int | None:
        """The primary's WAL insert position now; concurrent callers share one query."""
        pending = self._primary_lsn_refresh
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._primary_lsn_refresh = pending
            lsn: int | None = None
            try:
                lsn = await asyncio.wait_for(
                    self._query_primary_lsn(), self.settings.connect_timeout
                )
            except Exception:
                logger.debug("could not read the primary's WAL position", exc_info=True)
            finally:
                self._primary_lsn_refresh = None
                if not pending.done():  # also when cancelled: never strand the waiters
                    pending.set_result(lsn)
            if lsn is not None:
                self._written_lsn = max(self._written_lsn, lsn)
            return lsn
        return await asyncio.shield(pending)

    async def _query_primary_lsn(self) -> int:
        async with self.primary.engine.connect() as conn:
            driver = (await _raw_connection(conn)).driver_connection
            return int(await driver.fetchval(_WAL_INSERT_LSN))

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

    async def _enter(
        self,
        node: Node,
        maker: async_sessionmaker[AsyncSession],
        *,
        need: int = 0,
        wait: bool = False,
    ) -> tuple[AsyncSession, str]:
        node.state.in_flight += 1
        if self._is_fallback(node, maker):
            self._fallback_in_flight += 1
        try:
            return await self._open(node, maker, need=need, wait=wait)
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
            session, _ = await self._enter(primary, maker)
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

    def reader_session(
        self,
        *,
        consistency_token: str | None = None,
        read_your_writes: ReadYourWrites | None = None,
        max_lag_seconds: float | None = None,
    ) -> AbstractAsyncContextManager[AsyncSession]:
        """A read-only session on a fit replica (or the primary, see fallback).

        The connection is checked out and its transaction begun before this yields,
        so an unreachable replica is skipped before any of your code runs.

        Args:
            consistency_token: a position from :meth:`consistency_token` (e.g. carried
                in a task queue message): the read sees that write. Without it, the
                writes of the current request or task are honoured.
            read_your_writes: override the router's mode for this read.
            max_lag_seconds: override the lag bound for this read.

        Raises:
            NoHealthyReplicaError: no node could serve the read.
            ConsistencyTimeoutError: no replica caught up and fallback is off.
        """
        policy = self._policy(read_your_writes, max_lag_seconds)
        return self._reader([], policy, self._state_for(consistency_token, policy))

    def _state_for(self, token: str | None, policy: ReadPolicy) -> ConsistencyState | None:
        state = current_state()
        if token is None:
            return state
        claimed = self._codec.decode(token)
        if claimed is None:
            policy.decisions["token_ignored"] += 1
        return ConsistencyState(
            client_lsn=claimed or 0,
            own_lsn=state.own_lsn if state is not None else 0,
            wrote=state.wrote if state is not None else False,
        )

    def _policy(self, read_your_writes: ReadYourWrites | None, max_lag: float | None) -> ReadPolicy:
        policy = self._policies.get((read_your_writes, max_lag))
        if policy is not None:
            return policy
        mode = read_your_writes if read_your_writes is not None else self.settings.read_your_writes
        if mode not in ("off", "request", "lsn"):
            raise ConfigurationError(
                f"read_your_writes must be 'off', 'request' or 'lsn', got {mode!r}"
            )
        if mode == "lsn" and self.settings.read_your_writes != "lsn":
            raise ConfigurationError(
                "read_your_writes='lsn' on a read needs REPLICA_ROUTER_READ_YOUR_WRITES=lsn: "
                "only then do writers record their WAL position"
            )
        if max_lag is not None and not max_lag >= 0:
            raise ConfigurationError(f"max_lag_seconds must be >= 0, got {max_lag!r}")
        parts = [] if read_your_writes is None else [f"read_your_writes={mode}"]
        if max_lag is not None:
            parts.append(f"max_lag_seconds={max_lag:g}")
        policy = ReadPolicy(",".join(parts), mode, max_lag)
        self._policies[(read_your_writes, max_lag)] = policy
        return policy

    def reader_with(
        self,
        *,
        read_your_writes: ReadYourWrites | None = None,
        max_lag_seconds: float | None = None,
    ) -> ReaderDependency:
        """A reader dependency with its own consistency, for one group of routes.

        The same arguments return the same object, so ``dependency_overrides`` works.
        Its decisions are counted apart in ``router.status().reads``.

        Example::

            dashboard_reader = router.reader_with(max_lag_seconds=30, read_your_writes="off")

            @app.get("/dashboard")
            async def dashboard(db: AsyncSession = Depends(dashboard_reader)): ...

        Raises:
            ConfigurationError: a bad value, or ``"lsn"`` while the router's mode is not.
        """
        policy = self._policy(read_your_writes, max_lag_seconds)
        if policy is self._default_policy:
            return self.reader
        dependency = self._reader_dependencies.get(policy)
        if dependency is None:
            from .fastapi import make_reader

            def open_session() -> AbstractAsyncContextManager[AsyncSession]:
                return self._reader([], policy, current_state())

            dependency = make_reader(open_session, policy.name)
            self._reader_dependencies[policy] = dependency
        return dependency

    def consistency_token(self) -> str | None:
        """The position the current request or task must see, as a token, or None.

        After a writer committed, it covers that write: put it in a task queue
        message and read with ``reader_session(consistency_token=...)``.
        """
        state = current_state()
        if state is None:
            return None
        lsn = max(state.own_lsn, state.client_lsn)
        return self._codec.encode(lsn) if lsn else None

    @property
    def codec(self) -> TokenCodec:
        """Encodes and checks position tokens (signed with ``lsn_secret`` if set)."""
        return self._codec

    def _note_rejected_token(self) -> None:
        """Count a malformed or badly signed token (the middleware calls this)."""
        self._default_policy.decisions["token_ignored"] += 1

    @asynccontextmanager
    async def _reader(
        self, tried: list[Node], policy: ReadPolicy, state: ConsistencyState | None
    ) -> AsyncIterator[AsyncSession]:
        session, node = await self._checkout_reader(tried, policy, state)
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
            await _close_quietly(session)  # a reader holds no connection of its own

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
        # The pool's reset hook (_on_reset) records this commit's WAL position here.
        state = current_state(create=True) if self.settings.read_your_writes != "off" else None
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
                await session.run_sync(flush_then_commit)
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorKind.READ_ONLY:
                    self._primary_demoted("a write on the primary failed with 25006 (read-only)")
                if committing and kind in NODE_DOWN:
                    node.state.mark_down("down: connection lost during COMMIT", type(exc).__name__)
                    raise CommitOutcomeUnknownError(
                        "the connection to the primary was lost during COMMIT; the "
                        "transaction may or may not have committed"
                    ) from exc
                raise
            if state is not None:
                await self._after_commit(state)
        finally:
            self._leave(node, maker)
            await _close_quietly(session)

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
        if self.settings.read_your_writes != "lsn":
            return
        if reset_state.terminate_only or not reset_state.asyncio_safe:
            state.lsn_missing = True
            return
        try:
            lsn = _await(
                record.driver_connection.fetchval(
                    _WAL_INSERT_LSN, timeout=self.settings.connect_timeout
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
            lsn = await self._current_primary_lsn()
            if lsn is None:
                logger.warning(
                    "committed, but the primary's WAL position could not be read; later "
                    "reads of this client may not see this write"
                )
                return
            state.own_lsn = max(state.own_lsn, lsn)
        if state.own_lsn > self._written_lsn:
            self._written_lsn = state.own_lsn
            self._health.observe_primary_lsn(state.own_lsn)

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

    async def run_read(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        *,
        consistency_token: str | None = None,
        read_your_writes: ReadYourWrites | None = None,
        max_lag_seconds: float | None = None,
    ) -> T:
        """Run ``fn(session)`` on a reader; re-run it elsewhere if the node fails.

        ``fn`` must be a whole read that is safe to repeat. After a lost connection
        or a recovery conflict on a replica (40001, 40P01), it runs again on another
        node (the primary last, if allowed); any other error propagates at once.
        The keyword arguments are those of :meth:`reader_session`.

        Raises:
            NoHealthyReplicaError: no node is left to try.
            RetryExhaustedError: every attempt failed; ``last_exception`` says why.
        """
        tried: list[Node] = []
        attempts = self.settings.checkout_attempts + len(self.replicas)
        policy = self._policy(read_your_writes, max_lag_seconds)
        state = self._state_for(consistency_token, policy)
        for attempt in range(1, attempts + 1):
            before = len(tried)
            try:
                async with self._reader(tried, policy, state) as session:
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
            read_your_writes=self.settings.read_your_writes,
            reads=tuple(
                ReadPolicyStatus(
                    name=p.name,
                    read_your_writes=p.read_your_writes,
                    max_lag_seconds=p.max_lag_seconds,
                    decisions=dict(p.decisions),
                )
                for p in self._policies.values()
            ),
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
        checkout_histogram=tuple(s.checkout_counts),
        checkout_seconds=s.checkout_seconds,
    )


async def _begin_now(conn: Any) -> None:
    """Send the transaction's BEGIN now rather than with the first statement.

    asyncpg's adapter in SQLAlchemy begins lazily; sending BEGIN here proves the
    pooled connection works without an extra round trip (a ping would add one).
    """
    adapted = (await _raw_connection(conn)).dbapi_connection
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


async def _raw_connection(conn: AsyncConnection) -> Any:
    """The pooled DBAPI connection under ``conn``, without a greenlet hop when it is
    already there (it is, right after checkout)."""
    sync = conn.sync_connection
    if sync is not None and not sync.invalidated and not sync.closed:
        return sync.connection
    return await conn.get_raw_connection()


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


def _read_only_connection(dbapi_connection: Any, record: Any) -> None:
    """``connect`` on a replica: the adapter begins every transaction READ ONLY."""
    if not hasattr(dbapi_connection, "readonly"):
        raise ConfigurationError(
            "replica-router needs SQLAlchemy's asyncpg adapter (READ ONLY transactions)"
        )
    dbapi_connection.readonly = True


def _ran_statement(conn: Any, *args: Any) -> None:
    """``before_cursor_execute`` on the primary: this transaction ran something."""
    conn.info[_RAN_STATEMENTS] = True


def _committing(conn: Any) -> None:
    """``commit`` on the primary: a transaction that ran statements commits."""
    info = conn.info
    if info.get(_RAN_STATEMENTS):
        info[_COMMITTED] = True


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception:
        # The connection is already gone; the pool has invalidated it.
        logger.debug("closing a session failed", exc_info=True)
