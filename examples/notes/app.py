"""Notes, on replica-router: writes go to the primary, reads to the replicas.

Run it (from the repository root)::

    export REPLICA_ROUTER_PRIMARY_URL=postgresql://app:secret@localhost:5432/app
    export REPLICA_ROUTER_REPLICA_URLS=postgresql://app:secret@localhost:5433/app
    uvicorn examples.notes.app:app

Compare with ``app_get_db.py``, the same app on one engine:
``diff -u examples/notes/app_get_db.py examples/notes/app.py``.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, String, Text, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from replica_router import ReplicaRouter
from replica_router.metrics import mount_metrics


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True),
        default=lambda: datetime.now(UTC),
        server_default=func.now(),
        index=True,
    )


class NoteIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    body: str = ""


class NoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    body: str
    created_at: datetime


def create_app(router: ReplicaRouter | None = None) -> FastAPI:
    """The notes app on ``router`` (default: configured by ``REPLICA_ROUTER_*`` variables)."""
    router = router or ReplicaRouter.from_env()
    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with router.lifespan(app):
            async with router.primary.engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            yield

    app = FastAPI(title="notes", lifespan=lifespan)
    app.include_router(router.health_routes())
    mount_metrics(app, router)

    @app.post("/notes", status_code=201)
    async def create_note(note_in: NoteIn, db: Writer) -> NoteOut:
        note = Note(**note_in.model_dump())
        db.add(note)
        await db.flush()
        return NoteOut.model_validate(note)

    @app.get("/notes/{note_id}")
    async def read_note(note_id: int, db: Reader) -> NoteOut:
        note = await db.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404, detail="note not found")
        return NoteOut.model_validate(note)

    @app.get("/notes")
    async def list_notes(
        db: Reader, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> list[NoteOut]:
        query = select(Note).order_by(Note.created_at.desc(), Note.id.desc()).limit(limit)
        return [NoteOut.model_validate(note) for note in await db.scalars(query)]

    @app.put("/notes/{note_id}")
    async def update_note(note_id: int, note_in: NoteIn, db: Writer) -> NoteOut:
        note = await db.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404, detail="note not found")
        note.title, note.body = note_in.title, note_in.body
        return NoteOut.model_validate(note)

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: int, db: Writer) -> None:
        note = await db.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404, detail="note not found")
        await db.delete(note)

    @app.get("/whoami")
    async def whoami(db: Reader) -> dict[str, Any]:
        """Which server answered this read: its port, and whether it is a replica."""
        query = text("SELECT inet_server_port() AS server_port, pg_is_in_recovery() AS in_recovery")
        row = (await db.execute(query)).one()
        return {"server_port": row.server_port, "in_recovery": row.in_recovery}

    return app


app = create_app()
