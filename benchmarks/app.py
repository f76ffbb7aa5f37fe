"""The app the benchmarks serve with uvicorn; the database path is chosen by environment.

``BENCH_VARIANT=get_db``: the hand-written dependency of every FastAPI tutorial, one
engine for reads (``BENCH_READ_URL``) and one for writes (``BENCH_WRITE_URL``).

``BENCH_VARIANT=router``: ``ReplicaRouter.from_env()`` (``REPLICA_ROUTER_*``) with
``Depends(router.reader)`` / ``Depends(router.writer)``.

Routes: ``GET /items/{id}`` (ORM primary-key read), ``POST /items[?k=key]`` (insert),
``GET /slow/items/{id}`` (calls ``bench_slow(port)`` first, which sleeps on one
replica only), ``GET /rr/items/{id}`` (``router.run_read``, router only),
``GET /ready``, and with the router ``/health/nodes``.

``BENCH_BEGIN_FIRST=1`` (get_db only): the read session sends its BEGIN before the
endpoint runs, as the router does to prove its connection; the tutorial's goes out
with the first statement.

Pool sizes come from the environment, the same for both variants: ``get_db``'s
engines take ``BENCH_POOL_SIZE`` and ``BENCH_MAX_OVERFLOW`` (default 10 and 10), the
router its own settings ``REPLICA_ROUTER_POOL_SIZE`` and
``REPLICA_ROUTER_MAX_OVERFLOW`` (same defaults); ``benchmarks._common.pool_env`` sets
all four. The router gets no pool options in ``engine_options``, which would win over
its settings.

Read-your-writes (router only): ``POST /ryw/items`` inserts a row and returns its id;
``GET /ryw/items/{id}`` answers 200 with whether the row was found and whether a
replica served it (``pg_is_in_recovery()``). With ``BENCH_PIN_SECONDS`` > 0 they do
what Rails' ``DatabaseSelector`` does instead of the router's read-your-writes: the
writer sets a cookie with the time of the write, and while it is younger than that,
reads use the primary (``router.primary.reader_sessionmaker``), else ``router.reader``.
"""

# No ``from __future__ import annotations``: FastAPI resolves the annotations, which
# name local dependencies, at run time.
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from sqlalchemy import String, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from replica_router import ReplicaRouter


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    k: Mapped[str] = mapped_column(String(64), unique=True)
    v: Mapped[str] = mapped_column(String(200))


VARIANT = os.environ.get("BENCH_VARIANT", "get_db")
SLOW_PORT = int(os.environ.get("BENCH_SLOW_PORT", "0"))
PIN_SECONDS = float(os.environ.get("BENCH_PIN_SECONDS", "0"))
PIN_COOKIE = "bench_last_write"
BEGIN_FIRST = os.environ.get("BENCH_BEGIN_FIRST") == "1"
POOL = {
    "pool_size": int(os.environ.get("BENCH_POOL_SIZE", "10")),
    "max_overflow": int(os.environ.get("BENCH_MAX_OVERFLOW", "10")),
}


def _row(item: Item | None) -> dict[str, Any]:
    if item is None:
        raise HTTPException(404, "no such item")
    return {"id": item.id, "k": item.k, "v": item.v}


def _key(k: str | None) -> str:
    return k or uuid.uuid4().hex


def _get_db_app() -> FastAPI:
    read_engine = create_async_engine(os.environ["BENCH_READ_URL"], **POOL)
    write_engine = create_async_engine(os.environ["BENCH_WRITE_URL"], **POOL)
    ReadSession = async_sessionmaker(read_engine, expire_on_commit=False)
    WriteSession = async_sessionmaker(write_engine, expire_on_commit=False)

    async def get_read_db() -> AsyncIterator[AsyncSession]:
        async with ReadSession() as session:
            if BEGIN_FIRST:
                # SQLAlchemy's asyncpg adapter defers BEGIN to the first statement.
                raw = await (await session.connection()).get_raw_connection()
                adapter = raw.dbapi_connection
                assert adapter is not None  # a checked-out connection has one
                await adapter._start_transaction()
            yield session

    async def get_write_db() -> AsyncIterator[AsyncSession]:
        async with WriteSession() as session:
            yield session

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await read_engine.dispose()
        await write_engine.dispose()

    app = FastAPI(lifespan=lifespan)
    Writer = Annotated[AsyncSession, Depends(get_write_db)]

    @app.post("/items")
    async def create(db: Writer, k: str | None = None) -> dict[str, Any]:
        item = Item(k=_key(k), v="w")
        db.add(item)
        await db.commit()  # the tutorial way: commit in the endpoint
        return {"id": item.id}

    _add_reads(app, get_read_db)
    return app


def _router_app() -> FastAPI:
    router = ReplicaRouter.from_env(env_file=None)
    app = FastAPI(lifespan=router.lifespan)
    Writer = Annotated[AsyncSession, Depends(router.writer)]

    @app.post("/items")
    async def create(db: Writer, k: str | None = None) -> dict[str, Any]:
        item = Item(k=_key(k), v="w")
        db.add(item)
        await db.flush()  # the writer commits before the response is sent
        return {"id": item.id}

    # The measured routes first, where get_db's app has them: Starlette tries routes
    # in order, and five more ahead of them cost as much as the router's own work.
    _add_reads(app, router.reader)

    @app.get("/rr/items/{item_id}")
    async def read_rr(item_id: int) -> dict[str, Any]:
        return _row(await router.run_read(lambda s: s.get(Item, item_id)))

    app.include_router(router.health_routes())
    _add_ryw(app, router)
    return app


def _pinned_reader(router: ReplicaRouter) -> Callable[..., AsyncIterator[AsyncSession]]:
    """Rails' pin: the primary for ``PIN_SECONDS`` after this client's last write."""

    async def reader(request: Request) -> AsyncIterator[AsyncSession]:
        try:
            last = float(request.cookies.get(PIN_COOKIE, "nan"))
        except ValueError:
            last = float("nan")
        if time.time() - last < PIN_SECONDS:  # False for NaN: no recent write
            async with router.primary.reader_sessionmaker() as session:
                yield session
        else:
            async with router.reader_session() as session:
                yield session

    return reader


def _add_ryw(app: FastAPI, router: ReplicaRouter) -> None:
    # Function scope for the pin, as router.reader's own: released before the response.
    reader = (
        Depends(_pinned_reader(router), scope="function")
        if PIN_SECONDS > 0
        else Depends(router.reader)
    )
    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, reader]

    @app.post("/ryw/items")
    async def ryw_create(db: Writer, response: Response) -> dict[str, Any]:
        row = await db.execute(
            text("INSERT INTO items (k, v) VALUES (:k, 'ryw') RETURNING id"), {"k": _key(None)}
        )
        if PIN_SECONDS > 0:
            response.set_cookie(PIN_COOKIE, f"{time.time():.6f}", httponly=True)
        return {"id": row.scalar_one()}

    @app.get("/ryw/items/{item_id}")
    async def ryw_read(item_id: int, db: Reader) -> dict[str, Any]:
        row = await db.execute(
            text("SELECT EXISTS (SELECT 1 FROM items WHERE id = :id), pg_is_in_recovery()"),
            {"id": item_id},
        )
        found, replica = row.one()
        return {"found": found, "replica": replica}


def _add_reads(app: FastAPI, reader: Callable[..., Any]) -> None:
    @app.get("/items/{item_id}")
    async def read(item_id: int, db: Annotated[AsyncSession, Depends(reader)]) -> dict[str, Any]:
        return _row(await db.get(Item, item_id))

    @app.get("/slow/items/{item_id}")
    async def read_slow(
        item_id: int, db: Annotated[AsyncSession, Depends(reader)]
    ) -> dict[str, Any]:
        await db.execute(text("SELECT bench_slow(:p)"), {"p": SLOW_PORT})
        return _row(await db.get(Item, item_id))

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        return {"variant": VARIANT, "pid": os.getpid()}


_BUILDERS: dict[str, Callable[[], FastAPI]] = {"get_db": _get_db_app, "router": _router_app}
app = _BUILDERS[VARIANT]()
