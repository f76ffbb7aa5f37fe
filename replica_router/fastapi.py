"""FastAPI integration: the writer and reader dependencies and the health routes.

Users never import from here: ``router.writer``, ``router.reader`` and
``router.health_routes()`` are built from it.

Example::

    @app.post("/notes")
    async def create(note: NoteIn, db: AsyncSession = Depends(router.writer)): ...
"""

import math

# No ``from __future__ import annotations`` here: FastAPI resolves the dependencies'
# annotations at run time, and these name closures local to make_dependencies.
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from ._exceptions import NoHealthyNodeError

if TYPE_CHECKING:
    from ._router import ReplicaRouter

__all__ = ["health_routes", "make_dependencies", "make_reader"]

SessionDependency = Callable[..., Coroutine[Any, Any, AsyncSession]]


def _unavailable(exc: NoHealthyNodeError) -> HTTPException:
    return HTTPException(
        status_code=503,
        detail=str(exc),
        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
    )


def make_dependencies(router: "ReplicaRouter") -> tuple[SessionDependency, SessionDependency]:
    """The ``writer`` and ``reader`` dependencies of one router.

    Each is a plain ``async def`` returning the session that a *function-scoped*
    generator dependency holds, so users write ``Depends(router.writer)`` and still
    get the commit before the response is sent (fastapi >= 0.121.1; a default,
    request-scoped yield dependency would commit after the client saw a 200).
    They are stable objects: ``app.dependency_overrides[router.reader]`` works.
    """

    writer_scope = _scope(router.writer_session)

    async def writer(
        session: Annotated[AsyncSession, Depends(writer_scope, scope="function")],
    ) -> AsyncSession:
        """A session on the primary, committed before the response is sent."""
        return session

    return writer, make_reader(router.reader_session, "default")


def make_reader(open_session: Callable[[], Any], name: str) -> SessionDependency:
    """A reader dependency over ``open_session`` (a read policy's sessions)."""
    reader_scope = _scope(open_session)

    async def reader(
        session: Annotated[AsyncSession, Depends(reader_scope, scope="function")],
    ) -> AsyncSession:
        """A read-only session on a fit replica (or the primary as a fallback)."""
        return session

    reader.__qualname__ = f"reader[{name}]"
    return reader


def _scope(open_session: Callable[[], Any]) -> Callable[[], AsyncIterator[AsyncSession]]:
    """A generator dependency that holds one session from ``open_session``."""

    async def session_scope() -> AsyncIterator[AsyncSession]:
        context = open_session()
        try:
            session = await context.__aenter__()
        except NoHealthyNodeError as exc:
            raise _unavailable(exc) from exc
        async with _entered(context):
            yield session

    return session_scope


class _entered:
    """Exits an already entered async context manager, passing on what was raised."""

    __slots__ = ("_context",)

    def __init__(self, context: Any) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return bool(await self._context.__aexit__(exc_type, exc, tb))


def health_routes(router: "ReplicaRouter", prefix: str = "/health") -> APIRouter:
    """Liveness (``{prefix}/live``: 200 while the primary is reachable, else 503) and
    detail (``{prefix}/nodes``: every node as JSON, passwords masked)."""
    routes = APIRouter(prefix=prefix, tags=["health"])

    @routes.get("/live", summary="200 while the primary is reachable")
    async def live() -> JSONResponse:
        primary = router.primary.state
        body = {"status": "ok" if primary.up else "unavailable", "primary": router.primary.name}
        return JSONResponse(body, status_code=200 if primary.up else 503)

    @routes.get("/nodes", summary="every node: role, health, lag, load (URLs masked)")
    async def nodes() -> dict[str, Any]:
        return router.status().to_dict()

    return routes
