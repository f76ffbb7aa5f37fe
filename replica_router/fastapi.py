"""FastAPI integration: the writer and reader dependencies and the health routes.

Users never import from here: ``router.writer``, ``router.reader`` and
``router.health_routes()`` are built from it, over small interfaces (a callable
that opens a session, a source of status), never the router itself.

Example::

    @app.post("/notes")
    async def create(note: NoteIn, db: AsyncSession = Depends(router.writer)): ...
"""

import math

# No ``from __future__ import annotations`` here: FastAPI resolves the dependencies'
# annotations at run time, and these name closures local to make_dependencies.
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from ._exceptions import NoHealthyNodeError
from ._status import RouterStatus

__all__ = ["StatusSource", "health_routes", "make_dependencies", "make_reader"]

WriterDependency = Callable[..., Coroutine[Any, Any, AsyncSession]]
ReaderDependency = Callable[[], AsyncIterator[AsyncSession]]
OpenSession = Callable[[], AbstractAsyncContextManager[AsyncSession]]


class StatusSource(Protocol):
    """What the health routes read: a :class:`~replica_router.ReplicaRouter` is one."""

    def status(self) -> RouterStatus: ...


def _unavailable(exc: NoHealthyNodeError) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=str(exc),
        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
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
    """

    writer_scope = _scope(writer_session)

    async def writer(
        session: Annotated[AsyncSession, Depends(writer_scope, scope="function")],
    ) -> AsyncSession:
        """A session on the primary, committed before the response is sent."""
        return session

    return writer, make_reader(reader_session, "default")


def make_reader(open_session: OpenSession, name: str) -> ReaderDependency:
    """A reader dependency over ``open_session`` (a read policy's sessions)."""
    reader = _scope(open_session)
    reader.__doc__ = "A read-only session on a fit replica (or the primary as a fallback)."
    reader.__qualname__ = f"reader[{name}]"
    return reader


def _scope(open_session: OpenSession) -> ReaderDependency:
    """A generator dependency that holds one session from ``open_session``."""

    async def session_scope() -> AsyncIterator[AsyncSession]:
        try:
            async with open_session() as session:
                yield session
        except NoHealthyNodeError as exc:
            # No node at checkout (or in the endpoint's own sessions): a 503.
            raise _unavailable(exc) from exc

    return session_scope


def health_routes(source: StatusSource, prefix: str = "/health") -> APIRouter:
    """Liveness (``{prefix}/live``: 200 while the primary is reachable, else 503) and
    detail (``{prefix}/nodes``: every node as JSON, passwords masked)."""
    routes = APIRouter(prefix=prefix, tags=["health"])

    @routes.get("/live", summary="200 while the primary is reachable")
    async def live() -> JSONResponse:
        primary = source.status().primary
        up = primary.healthy  # reachable, for the primary
        body = {"status": "ok" if up else "unavailable", "primary": primary.name}
        return JSONResponse(body, status_code=200 if up else 503)

    @routes.get("/nodes", summary="every node: role, health, lag, load (URLs masked)")
    async def nodes() -> dict[str, Any]:
        return source.status().to_dict()

    return routes
