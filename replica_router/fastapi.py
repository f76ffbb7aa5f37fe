"""FastAPI integration: the writer and reader dependencies and the health routes.

Users never import from here: ``router.writer``, ``router.reader`` and
``router.health_routes()`` are built from it, over small interfaces (a callable
that opens a session, a source of status), never the router itself.

Example::

    @app.post("/notes")
    async def create(note: NoteIn, db: AsyncSession = Depends(router.writer)): ...
"""

import logging
import math
import warnings
import weakref

# No ``from __future__ import annotations`` here: FastAPI resolves the dependencies'
# annotations at run time, and these name closures local to make_dependencies.
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, NoReturn, Protocol

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from ._consistency import current_state
from ._exceptions import (
    CommitNotSentError,
    CommitOutcomeUnknownError,
    NoHealthyNodeError,
    SessionClosedError,
)
from ._retry import NODE_DOWN, ErrorKind, classify
from ._status import RouterStatus
from ._status_page import status_page

__all__ = [
    "StatusSource",
    "check_overrides",
    "health_routes",
    "is_router_writer",
    "make_dependencies",
    "make_reader",
]

logger = logging.getLogger("replica_router")

WriterDependency = Callable[..., Coroutine[Any, Any, AsyncSession]]
ReaderDependency = Callable[[], AsyncIterator[AsyncSession]]
OpenSession = Callable[[], AbstractAsyncContextManager[AsyncSession]]

# Every router's writer dependency: an override by one of them still commits.
_WRITERS: "weakref.WeakSet[Callable[..., Any]]" = weakref.WeakSet()

_WRITER_CLOSED = (
    "this session came from router.writer, which committed and closed it when the "
    "endpoint returned, before the response was sent; a StreamingResponse body or a "
    "BackgroundTasks job runs later and needs a session of its own: "
    "async with router.writer_session() as db: ..."
)
_READER_CLOSED = (
    "this session came from router.reader, which released it after the response was "
    "sent; code that runs later needs a session of its own: "
    "async with router.reader_session() as db: ..."
)


class StatusSource(Protocol):
    """What the health routes read: a :class:`~replica_router.ReplicaRouter` is one."""

    def status(self) -> RouterStatus: ...


def _unavailable(exc: NoHealthyNodeError) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=str(exc),
        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
    )


def _lost(exc: Exception, session: AsyncSession | None, writer: bool) -> HTTPException | None:
    """A 503 for a node lost mid-request before anything was committed (a shutdown,
    a lost connection, a replica that hung past READ_TIMEOUT, COMMIT never sent): the
    client may retry. One log line, not a traceback per request."""
    if isinstance(exc, CommitOutcomeUnknownError):
        return None  # it may have committed: never invite a blind retry
    if not isinstance(exc, CommitNotSentError):
        kind = classify(exc)
        # 25006 on the writer: the primary turned read-only (a failover); on a reader
        # it is the user's write through a reader, a bug: a 500. A reader's timeout is
        # a replica that hung (READ_TIMEOUT); a writer's is the user's own bound.
        passing = ErrorKind.READ_ONLY if writer else ErrorKind.TIMEOUT
        if kind not in NODE_DOWN and kind is not passing:
            return None
        what = kind.value
    else:
        what = "COMMIT not sent"
    bind = session.bind if session is not None else None
    url = getattr(bind, "url", None)
    where = f"{url.host}:{url.port}" if url is not None and url.host else "the primary"
    logger.warning("a session on %s was lost mid-request (%s); answering 503", where, what)
    return HTTPException(
        status_code=503,
        detail=f"the database connection was lost ({what}); nothing was committed, retry",
        headers={"Retry-After": "1"},
    )


def make_dependencies(
    writer_session: OpenSession, reader_session: OpenSession
) -> tuple[WriterDependency, ReaderDependency]:
    """The ``writer`` and ``reader`` dependencies over a router's session openers.

    The writer is a plain ``async def`` returning the session that a
    *function-scoped* generator dependency holds, so users write
    ``Depends(router.writer)`` and still get the commit before the response is sent
    (fastapi >= 0.121.1; a default, request-scoped yield dependency would commit
    after the client saw a 200). The reader has nothing to commit: it is a plain
    generator dependency, released after the response like the tutorial's
    ``get_db`` (one dependency level less per request, and a ``StreamingResponse``
    can still read through it). Both are stable objects:
    ``app.dependency_overrides[router.reader]`` works.

    A session used after its dependency closed it raises :class:`SessionClosedError`,
    whose message says which context manager to use instead.
    """

    writer_scope = _scope(writer_session, _WRITER_CLOSED, writer=True)

    async def writer(
        session: Annotated[AsyncSession, Depends(writer_scope, scope="function")],
    ) -> AsyncSession:
        """A session on the primary, committed before the response is sent."""
        return session

    _WRITERS.add(writer)
    return writer, make_reader(reader_session, "default")


def make_reader(open_session: OpenSession, name: str) -> ReaderDependency:
    """A reader dependency over ``open_session`` (a read policy's sessions)."""
    reader = _scope(open_session, _READER_CLOSED, writer=False)
    reader.__doc__ = "A read-only session on a fit replica (or the primary as a fallback)."
    reader.__qualname__ = f"reader[{name}]"
    return reader


def _scope(open_session: OpenSession, closed_message: str, *, writer: bool) -> ReaderDependency:
    """A generator dependency that holds one session from ``open_session``."""

    def closed(*args: Any, **kwargs: Any) -> NoReturn:
        raise SessionClosedError(closed_message)

    async def session_scope() -> AsyncIterator[AsyncSession]:
        session: AsyncSession | None = None
        try:
            async with open_session() as session:
                yield session
        except NoHealthyNodeError as exc:
            # No node at checkout (or in the endpoint's own sessions): a 503.
            raise _unavailable(exc) from exc
        except Exception as exc:
            unavailable = _lost(exc, session, writer)
            if unavailable is None:
                raise
            raise unavailable from exc
        finally:
            if session is not None:
                # Every later transaction of a closed session (close_resets_only=False)
                # begins here: say what to use instead of SQLAlchemy's "permanently
                # closed". An instance attribute, so the user's session class_ stays.
                vars(session.sync_session)["_autobegin_t"] = closed
                if writer:
                    state = current_state()
                    if state is not None:  # the middleware holds back a streamed body
                        state.writer_closed = True

    return session_scope


def is_router_writer(dependency: object) -> bool:
    """Whether ``dependency`` is some router's ``writer`` (it commits by itself)."""
    try:
        return dependency in _WRITERS
    except TypeError:  # not hashable, not weak-referenceable: not ours
        return False


def check_overrides(overrides: Mapping[Any, Any], writer: object, warned: set[int]) -> None:
    """Warn once per override when ``app.dependency_overrides[writer]`` is no router's
    writer: routes no longer call ``commit()``, so a ``get_db``-style override loses
    every write."""
    override = overrides.get(writer)
    if override is None or is_router_writer(override) or id(override) in warned:
        return
    warned.add(id(override))
    name = getattr(override, "__qualname__", None) or type(override).__name__
    warnings.warn(
        f"app.dependency_overrides[router.writer] is {name}, which is no router's writer: "
        "routes no longer call commit(), so its session is never committed unless it "
        "commits before the response is sent, and writes are lost. In tests, point the "
        "app at a router over the test database: router.override_for_tests(app, test_router)",
        UserWarning,
        stacklevel=2,
    )


def health_routes(source: StatusSource, prefix: str = "/health") -> APIRouter:
    """The routes an orchestrator and a person need (mount them with
    ``app.include_router``):

    * ``{prefix}/live``: 200 while the process and the router are alive; it never
      touches a database (a liveness probe: a down primary is not cured by a restart).
    * ``{prefix}/ready``: 503 only when neither reads nor writes can be served; the
      body says which can, and from which nodes (a readiness probe).
    * ``{prefix}/nodes``: every node as JSON (role, health and why not, lag, load, the
      read policies and their decisions; passwords masked).
    * ``{prefix}/ui``: an HTML page that renders ``{prefix}/nodes`` every second.
    """
    routes = APIRouter(prefix=prefix, tags=["health"])
    page = status_page("nodes")  # relative to {prefix}/ui

    @routes.get("/live", summary="200 while the process and the router are alive")
    async def live() -> JSONResponse:
        status = source.status()
        # Started, its probes stopped: the router's background work died.
        alive = status.health_checks_running or not status.started
        body = {
            "status": "alive" if alive else "stalled",
            "started": status.started,
            "health_checks_running": status.health_checks_running,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @routes.get("/ready", summary="503 only when neither reads nor writes can be served")
    async def ready() -> JSONResponse:
        status = source.status()
        can = status.readiness()
        both, either = can["reads"] and can["writes"], can["reads"] or can["writes"]
        body = {
            "status": "ready" if both else ("degraded" if either else "unavailable"),
            **can,
            "health_checks_running": status.health_checks_running,
            "warnings": list(status.warnings),
        }
        return JSONResponse(body, status_code=200 if either else 503)

    @routes.get("/nodes", summary="every node: role, health, lag, load (URLs masked)")
    async def nodes() -> dict[str, Any]:
        return source.status().to_dict()

    @routes.get("/ui", response_class=HTMLResponse, summary="a status page over /nodes")
    async def ui() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return routes
