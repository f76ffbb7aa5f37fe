"""The demo's notes app, the uvicorn server it runs on, and the packages it needs."""

# No ``from __future__ import annotations``: FastAPI resolves the demo app's
# annotations at run time, and they name classes local to build_app().
import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any

from fastapi import FastAPI

from .._router import ReplicaRouter

__all__ = ["DemoSetupError", "build_app", "check_packages", "serve"]

_MISSING_PACKAGES = (
    "the demo needs uvicorn, httpx and rich ({missing}); install them with "
    "pip install 'replica-router[embedded]' (or pip install uvicorn httpx rich)"
)


class DemoSetupError(Exception):
    """The demo cannot run here: a package or PostgreSQL binaries are missing."""


def build_app(router: ReplicaRouter) -> FastAPI:
    """A small notes app whose every response names the server that answered."""
    from typing import Annotated

    from fastapi import Depends
    from pydantic import BaseModel
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]

    class NoteIn(BaseModel):
        body: str

    app = FastAPI(title="replica-router demo", lifespan=router.lifespan)
    app.include_router(router.health_routes())

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn, db: Writer) -> dict[str, Any]:
        query = text(
            "INSERT INTO demo_notes (body) VALUES (:body) RETURNING id, inet_server_port() AS port"
        )
        row = (await db.execute(query, {"body": note.body})).one()
        return {"id": row.id, "server_port": row.port}

    @app.get("/notes/latest")
    async def latest(db: Reader) -> dict[str, Any]:
        query = text(
            "SELECT inet_server_port() AS port, pg_is_in_recovery() AS in_recovery, "
            "(SELECT max(id) FROM demo_notes) AS newest"
        )
        row = (await db.execute(query)).one()
        return {"server_port": row.port, "in_recovery": row.in_recovery, "newest": row.newest}

    return app


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield its base URL."""
    import uvicorn

    class _Server(uvicorn.Server):
        # The demo handles SIGINT itself; uvicorn's handler would re-raise it.
        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, log_level="critical", access_log=False, lifespan="on"
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise DemoSetupError("the demo app did not start")
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 15.0)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        sock.close()


def check_packages() -> None:
    """Raise :class:`DemoSetupError` naming the demo's packages that are not installed."""
    import importlib.util

    missing = [m for m in ("uvicorn", "httpx", "rich") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoSetupError(_MISSING_PACKAGES.format(missing=", ".join(missing)))
