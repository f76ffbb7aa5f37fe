"""A small app for the read-your-writes tests, configured from the environment.

``uvicorn tests.integration.ryw_app:create_app --factory --workers 2`` runs it in
several worker processes; each response names the process that served it.
"""

# No "from __future__ import annotations": FastAPI resolves these local aliases at run time.

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import ReplicaRouter


def create_app(router: ReplicaRouter | None = None) -> FastAPI:
    router = router if router is not None else ReplicaRouter.from_env(env_file=None)
    app = FastAPI(lifespan=router.lifespan)
    app.state.router = router
    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]
    Relaxed = Annotated[
        AsyncSession,
        Depends(router.reader_with(read_your_writes="off", max_lag_seconds=3600)),
    ]

    @app.post("/notes")
    async def create(db: Writer) -> dict[str, Any]:
        note_id = (
            await db.execute(text("INSERT INTO ryw_notes (body) VALUES ('x') RETURNING id"))
        ).scalar_one()
        return {"id": note_id, "pid": os.getpid()}

    @app.post("/nothing")
    async def nothing(db: Writer) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def fetch(db: AsyncSession, note_id: int) -> dict[str, Any]:
        row = (
            await db.execute(
                text(
                    "SELECT (SELECT id FROM ryw_notes WHERE id = :id), pg_is_in_recovery(), "
                    "inet_server_port()"
                ),
                {"id": note_id},
            )
        ).one()
        if row[0] is None:
            raise HTTPException(404, detail={"replica": row[1], "pid": os.getpid()})
        return {"id": row[0], "replica": row[1], "port": row[2], "pid": os.getpid()}

    @app.get("/notes/{note_id}")
    async def read(note_id: int, db: Reader) -> dict[str, Any]:
        return await fetch(db, note_id)

    @app.get("/relaxed/{note_id}")
    async def read_relaxed(note_id: int, db: Relaxed) -> dict[str, Any]:
        return await fetch(db, note_id)

    @app.post("/write-then-read")
    async def write_then_read() -> dict[str, Any]:
        # Sequential sessions inside one request: what request mode is for.
        async with router.writer_session() as db:
            note_id = (
                await db.execute(text("INSERT INTO ryw_notes (body) VALUES ('y') RETURNING id"))
            ).scalar_one()
        async with router.reader_session() as db:
            return await fetch(db, note_id)

    return app
