"""The router: a facade that builds the nodes and composes reads, writes and health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, Self, TypeVar

from fastapi import APIRouter, FastAPI
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from . import fastapi as _fastapi
from ._checkout import Checkout, query_value
from ._consistency import (
    WAL_INSERT_LSN_SQL,
    PrimaryPosition,
    ReadYourWrites,
    TokenCodec,
    add_middleware,
    current_state,
    install_middleware,
    token_for,
)
from ._exceptions import ReplicaRouterError
from ._health import HealthChecker
from ._lifecycle import Lifecycle, primary_url_of
from ._membership import Membership
from ._nodes import Node, build_topology, dispose_node
from ._reads import Reads
from ._selection import make_selector
from ._settings import ENV_PREFIX, RouterSettings
from ._status import RouterStatus, node_status
from ._units import run_read, run_write
from ._urls import mask_url
from ._writes import IsolationLevel, Writes

__all__ = ["IsolationLevel", "ReplicaRouter"]

T = TypeVar("T")


class ReplicaRouter:
    """Read/write splitting over one primary and any number of streaming replicas.

    Args:
        primary_url: the primary (``postgresql+asyncpg://``, ``postgresql://``,
            ``postgresql+psycopg://``); several hosts as ``?host=h1:5432&host=h2:5432``.
        replica_urls: the replicas (``?replica_name=...&replica_weight=...``).
        settings: tuning; defaults when omitted (only :meth:`from_env` reads the environment).
        engine_options: for every node's ``create_async_engine`` (pool sizing,
            ``connect_args``, ``poolclass``, ...); they win over the settings.
        session_options: for every node's ``async_sessionmaker`` (``class_``, ``info``, ...).
    """

    __slots__ = (
        "__weakref__",
        "_checkout",
        "_codec",
        "_health",
        "_lifecycle",
        "_members",
        "_reader_dependencies",
        "_reads",
        "_topology",
        "_writes",
        "reader",
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
        s = self.settings = settings if settings is not None else RouterSettings.defaults()
        engine_options = dict(engine_options or {})
        session_options = dict(session_options or {})
        topology = self._topology = build_topology(
            primary_url, replica_urls, s, engine_options, session_options
        )
        self._health = HealthChecker(
            topology,
            s,
            connect_args=dict(engine_options.get("connect_args", {})),
            on_primary_demoted=lambda why: self._writes.primary_demoted(why),
        )
        self._checkout = Checkout(s, self._health.node_down)
        self._codec = TokenCodec(s.lsn_secret.get_secret_value().encode() if s.lsn_secret else None)
        position = PrimaryPosition(
            probed=lambda: self._health.primary_lsn,
            query=lambda: query_value(self.primary, WAL_INSERT_LSN_SQL, s.connect_timeout),
            timeout=s.connect_timeout,
            observe=self._health.observe_primary_lsn,
        )
        self._reads = Reads(
            topology,
            s,
            self._checkout,
            make_selector(s.strategy),
            self._codec,
            position,
            probing=lambda: self._health.running,
            pool_size=engine_options.get("pool_size", s.pool_size)
            + engine_options.get("max_overflow", s.max_overflow),
        )
        self._writes = Writes(topology, s, self._checkout, position)
        self._members = Membership(topology, s, self._health, engine_options, session_options)
        self._lifecycle = Lifecycle()
        self._reader_dependencies: dict[tuple[Any, Any], _fastapi.ReaderDependency] = {}
        self.writer, self.reader = _fastapi.make_dependencies(
            self.writer_session, self._default_reader_session
        )

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
        router = cls(
            primary_url_of(settings, env_prefix),
            settings.replica_urls,
            settings=settings,
            engine_options=engine_options,
            session_options=session_options,
        )
        if "replica_urls" not in settings.model_fields_set:  # unset, not set empty
            router._lifecycle.replicas_unset = f"{env_prefix}REPLICA_URLS"
        return router

    # -- nodes -------------------------------------------------------------------------

    @property
    def primary(self) -> Node:
        return self._topology.primary

    @property
    def replicas(self) -> tuple[Node, ...]:
        return self._topology.replicas

    async def set_replicas(self, replica_urls: Sequence[str | URL]) -> None:
        """Replace the replicas while running: nodes whose URL stays are kept, new ones
        serve after their first probe, removed ones close once their sessions end."""
        await self._members.set_replicas(replica_urls)

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The primary, then the replicas."""
        return self._topology.nodes

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every node once and start the background health checks (raises
        ``ReplicaRouterError`` when a node that ``require_at_start`` names failed)."""
        life = self._lifecycle
        if life.started:
            return
        try:
            await self._members.start()  # Patroni, DNS: the replicas to start with
            await life.start(self._topology, self.settings)
        except ReplicaRouterError:
            await self.close()
            raise
        await self._health.start()
        life.started = True  # after the first probes: /live never sees it half started

    async def close(self) -> None:
        """Stop health checks and dispose every engine, each within ``dispose_timeout``."""
        await self._members.stop()  # discovery, and the pools of removed nodes
        if self._lifecycle.started:
            self._lifecycle.started = False
            await self._health.stop()
        timeout = self.settings.dispose_timeout
        await asyncio.gather(*(dispose_node(node, timeout) for node in self.nodes))

    aclose = close

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """FastAPI lifespan: ``FastAPI(lifespan=router.lifespan)``; also puts
        :class:`ReadYourWritesMiddleware` around the app (unless it is there)."""
        self.install_middleware(app)
        async with self:
            yield

    def install_middleware(self, app: Any) -> None:
        """Wrap a started app in :class:`ReadYourWritesMiddleware` (the lifespan does;
        nothing if it is there already)."""
        install_middleware(app, self)

    def override_for_tests(self, app: FastAPI, replacement: ReplicaRouter) -> None:
        """Serve this router's dependencies in ``app`` from ``replacement``, a started
        router over the test database: ``writer`` (which still commits before the
        response), ``reader`` and every ``reader_with(...)``. Adds the middleware if the
        app has not started (``httpx.ASGITransport`` runs no lifespan). Undo with
        ``app.dependency_overrides.clear()``."""
        overrides = app.dependency_overrides
        overrides.update({self.writer: replacement.writer, self.reader: replacement.reader})
        for (mode, lag), dep in self._reader_dependencies.items():
            overrides[dep] = replacement.reader_with(read_your_writes=mode, max_lag_seconds=lag)
        add_middleware(app, self)

    # -- sessions ----------------------------------------------------------------------

    def reader_session(
        self,
        *,
        consistency_token: str | None = None,
        read_your_writes: ReadYourWrites | None = None,
        max_lag_seconds: float | None = None,
    ) -> AbstractAsyncContextManager[AsyncSession]:
        """A read-only session on a fit replica (or the primary, see fallback), its
        transaction begun before this yields (an unreachable replica is skipped first).

        Args:
            consistency_token: from :meth:`consistency_token` (a task queue message): the
                read sees that write; without it, the current request's or task's.
            read_your_writes, max_lag_seconds: override the router's for this read.

        Raises:
            NoHealthyReplicaError: no node could serve the read.
            ConsistencyTimeoutError: no replica caught up and fallback is off.
        """
        self._lifecycle.session_opened()
        return self._reads.scope(consistency_token, read_your_writes, max_lag_seconds)

    def _default_reader_session(self) -> AbstractAsyncContextManager[AsyncSession]:
        self._lifecycle.session_opened()  # reader_session(), for router.reader: no keywords
        return self._reads.default_scope()

    def reader_with(
        self,
        *,
        read_your_writes: ReadYourWrites | None = None,
        max_lag_seconds: float | None = None,
    ) -> _fastapi.ReaderDependency:
        """A reader dependency with its own consistency, for one group of routes.

        The same arguments return the same object, so ``dependency_overrides`` works.
        Its decisions are counted apart in ``router.status().reads``. Example:
        ``Depends(router.reader_with(max_lag_seconds=30, read_your_writes="off"))``.

        Raises:
            ConfigurationError: a bad value, or ``"lsn"`` while the router's mode is not.
        """
        reads = self._reads
        policy = reads.policy(read_your_writes, max_lag_seconds)
        if policy is reads.default_policy:
            return self.reader
        key = (read_your_writes, max_lag_seconds)
        dependency = self._reader_dependencies.get(key)
        if dependency is None:
            opener = partial(
                self.reader_session,
                read_your_writes=read_your_writes,
                max_lag_seconds=max_lag_seconds,
            )
            dependency = self._reader_dependencies[key] = _fastapi.make_reader(opener, policy.name)
        return dependency

    def writer_session(
        self, *, isolation_level: IsolationLevel | None = None
    ) -> AbstractAsyncContextManager[AsyncSession]:
        """A session on the primary, committed when the block ends without error (an
        exception rolls back; a failed commit propagates, so a route answers 500, never
        2xx). ``isolation_level``: e.g. ``"SERIALIZABLE"`` (default: the server's).

        Raises:
            PrimaryUnavailableError: no working connection to the primary.
            CommitOutcomeUnknownError: COMMIT was sent and its answer lost.
        """
        self._lifecycle.session_opened()
        return self._writes.session(isolation_level)

    def consistency_token(self) -> str | None:
        """The position the current request or task must see, as a token, or None; after
        a writer committed, it covers that write (``reader_session(consistency_token=)``)."""
        return token_for(current_state(), self._codec)

    @property
    def codec(self) -> TokenCodec:
        """Encodes and checks position tokens (signed with ``lsn_secret`` if set)."""
        return self._codec

    def _note_rejected_token(self) -> None:
        self._reads.default_policy.decisions["token_ignored"] += 1

    async def run_read(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        *,
        consistency_token: str | None = None,
        read_your_writes: ReadYourWrites | None = None,
        max_lag_seconds: float | None = None,
    ) -> T:
        """Run ``fn(session)`` on a reader; re-run it elsewhere if the node fails.

        ``fn`` must be a whole read that is safe to repeat. After a lost connection or
        a recovery conflict on a replica (40001, 40P01), it runs again on another node
        (the primary last, if allowed). The keywords are :meth:`reader_session`'s.

        Raises:
            NoHealthyReplicaError: no node is left to try.
            RetryExhaustedError: every attempt failed; ``last_exception`` says why.
        """
        self._lifecycle.session_opened()
        reads = self._reads
        policy = reads.policy(read_your_writes, max_lag_seconds)
        attempts = self.settings.checkout_attempts + len(self.replicas)
        return await run_read(
            reads, fn, policy, reads.state_for(consistency_token, policy), attempts
        )

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
        before COMMIT was sent; so ``fn`` must have no effects outside it. If the
        connection is lost during COMMIT, :class:`CommitOutcomeUnknownError`
        propagates and ``fn`` never runs again. ``attempts``: the most runs (default:
        ``checkout_attempts`` + 2); ``isolation_level``: e.g. ``"SERIALIZABLE"``.

        Raises:
            CommitOutcomeUnknownError: the outcome of COMMIT is unknown.
            RetryExhaustedError: every attempt failed; ``last_exception`` says why.
        """
        self._lifecycle.session_opened()
        limit = attempts if attempts is not None else self.settings.checkout_attempts + 2
        return await run_write(
            self._writes, self._checkout, lambda: self.primary, fn, isolation_level, limit
        )

    # -- status ------------------------------------------------------------------------

    def status(self) -> RouterStatus:
        """A snapshot of every node, and what is wrong with the set-up; URLs are masked."""
        reads, s, life = self._reads, self.settings, self._lifecycle
        return RouterStatus(
            nodes=tuple(node_status(n) for n in self.nodes),
            fallback_in_flight=reads.fallback_in_flight,
            fallback_cap=reads.fallback_cap,
            strategy=s.strategy,
            health_checks_running=self._health.running,
            read_your_writes=s.read_your_writes,
            reads=reads.policy_status(),
            started=life.started,
            read_your_writes_active=s.read_your_writes != "off" and life.middleware,
            fallback_to_primary=s.fallback_to_primary,
            warnings=life.warnings(s, len(self.replicas)),
        )

    def health_routes(self, prefix: str = "/health") -> APIRouter:
        """An ``APIRouter`` with ``{prefix}/live``, ``/ready``, ``/nodes`` and ``/ui``
        (see the README's "Health routes"); mount it with ``app.include_router``."""
        return _fastapi.health_routes(self, prefix)

    def _note_middleware(self) -> None:
        self._lifecycle.middleware = True  # a ReadYourWritesMiddleware serves this router

    def _check_overrides(self, overrides: Mapping[Any, Any]) -> None:
        _fastapi.check_overrides(overrides, self.writer, self._lifecycle.overrides_warned)

    def __repr__(self) -> str:
        return (
            f"<ReplicaRouter primary={mask_url(self.primary.url)} "
            f"replicas={[mask_url(r.url) for r in self.replicas]}>"
        )
