"""Notes, the tutorial way: one engine, one ``get_db`` dependency for every route.

Run it (from the repository root)::

    export DATABASE_URL=postgresql+asyncpg://app:secret@localhost:5432/app
    uvicorn examples.notes.app_get_db:app

``app.py`` is the same app on replica-router:
``diff -u examples/notes/app_get_db.py examples/notes/app.py``.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, String, Text, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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


def create_app(database_url: str | None = None) -> FastAPI:
    """The notes app on one database (default: the ``DATABASE_URL`` variable)."""
    engine = create_async_engine(database_url or os.environ["DATABASE_URL"])
    SessionLocal = async_sessionmaker(engine, expire_on_commit=False)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with SessionLocal() as db:
            yield db

    Db = Annotated[AsyncSession, Depends(get_db)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(title="notes", lifespan=lifespan)
    mount_metrics(app)

    @app.post("/notes", status_code=201)
    async def create_note(note_in: NoteIn, db: Db) -> NoteOut:
        note = Note(**note_in.model_dump())
        db.add(note)
        await db.commit()
        return NoteOut.model_validate(note)

    @app.get("/notes/{note_id}")
    async def read_note(note_id: int, db: Db) -> NoteOut:
        note = await db.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404, detail="note not found")
        return NoteOut.model_validate(note)

    @app.get("/notes")
    async def list_notes(db: Db, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[NoteOut]:
        query = select(Note).order_by(Note.created_at.desc(), Note.id.desc()).limit(limit)
        return [NoteOut.model_validate(note) for note in await db.scalars(query)]

    @app.put("/notes/{note_id}")
    async def update_note(note_id: int, note_in: NoteIn, db: Db) -> NoteOut:
        note = await db.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404, detail="note not found")
        note.title, note.body = note_in.title, note_in.body
        await db.commit()
        return NoteOut.model_validate(note)

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: int, db: Db) -> None:
        note = await db.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404, detail="note not found")
        await db.delete(note)
        await db.commit()

    @app.get("/whoami")
    async def whoami(db: Db) -> dict[str, Any]:
        """Which server answered this read: its port, and whether it is a replica."""
        query = text("SELECT inet_server_port() AS server_port, pg_is_in_recovery() AS in_recovery")
        row = (await db.execute(query)).one()
        return {"server_port": row.server_port, "in_recovery": row.in_recovery}

    return app


app = create_app()
