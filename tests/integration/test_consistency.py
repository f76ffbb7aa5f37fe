"""Read-your-writes on real servers (design.md promise 6, issue #5).

Replay is paused on every replica, so a read that lands on a replica cannot see a
write made after the pause: each test shows both that the feature returns the
write and (with the feature off) that the same reads would have been stale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _serve import serve, uvicorn_process
from ryw_app import create_app
from sqlalchemy import text

from replica_router import ReadYourWritesMiddleware, ReplicaRouter, RouterSettings
from replica_router._checkout import query_value
from replica_router._consistency import PrimaryPosition, parse_lsn
from replica_router.testing import LocalCluster
from replica_router.testing.pytest_plugin import DRIVERS

pytestmark = pytest.mark.integration
# The promise tests run once per driver: the cluster's URLs name asyncpg, then psycopg.
BOTH_DRIVERS = pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)

SECRET = "correct horse battery staple"


def settings(**values: Any) -> RouterSettings:
    # A generous lag bound keeps paused replicas "fit", so only read-your-writes
    # stands between a read and a stale replica.
    base: dict[str, Any] = {
        "health_interval": 0.2,
        "health_timeout": 1.0,
        "max_lag_seconds": 3600,
        "max_lag_bytes": 2**40,
        "consistency_wait": 0.02,
    }
    return RouterSettings.defaults(**{**base, **values})


def make_router(cluster: LocalCluster, **values: Any) -> ReplicaRouter:
    return ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=settings(**values))


@pytest.fixture
def notes(replica_cluster: LocalCluster) -> Iterator[LocalCluster]:
    replica_cluster.execute(
        "primary",
        "DROP TABLE IF EXISTS ryw_notes; CREATE TABLE ryw_notes (id serial PRIMARY KEY, body text)",
    )
    replica_cluster.wait_for_replay()
    yield replica_cluster
    for node in replica_cluster.replicas:
        replica_cluster.resume_replay(node)


def pause_all(cluster: LocalCluster) -> None:
    for node in cluster.replicas:
        cluster.pause_replay(node)


def resume_all(cluster: LocalCluster) -> None:
    for node in cluster.replicas:
        cluster.resume_replay(node)
    cluster.wait_for_replay()


async def cycles(client: httpx.AsyncClient, n: int) -> tuple[int, int]:
    """``n`` write-then-read cycles; returns (reads that saw the write, stale reads)."""
    seen = stale = 0
    for _ in range(n):
        created = await client.post("/notes")
        assert created.status_code == 200, created.text
        read = await client.get(f"/notes/{created.json()['id']}")
        assert read.status_code in (200, 404), read.text
        if read.status_code == 200:
            seen += 1
        else:
            stale += 1
    return seen, stale


@BOTH_DRIVERS
async def test_lsn_mode_sees_every_write_while_replay_is_paused(notes: LocalCluster) -> None:
    router = make_router(notes, read_your_writes="lsn")
    async with serve(create_app(router)) as url, httpx.AsyncClient(base_url=url) as client:
        pause_all(notes)
        seen, stale = await cycles(client, 200)
        assert (seen, stale) == (200, 0)
        decisions = router.status().reads[0].decisions
        assert decisions["primary_behind"] == 200, decisions
        assert "rr_lsn" in client.cookies

        # Once the replicas replay the client's last write, its reads use them again.
        resume_all(notes)
        last = (await client.post("/notes")).json()["id"]
        await asyncio.sleep(0.3)  # a probe or two
        for _ in range(10):
            read = await client.get(f"/notes/{last}")
            assert read.status_code == 200
            assert read.json()["replica"] is True
    assert decisions["primary_fallback"] == 0


async def test_off_mode_reads_are_stale_while_replay_is_paused(notes: LocalCluster) -> None:
    # The counter-proof: the same cycles without read-your-writes miss the writes.
    router = make_router(notes, read_your_writes="off")
    async with serve(create_app(router)) as url, httpx.AsyncClient(base_url=url) as client:
        pause_all(notes)
        seen, stale = await cycles(client, 200)
        assert stale == 200, (seen, stale)
        assert "rr_lsn" not in client.cookies


async def test_a_client_without_the_cookie_is_not_slowed(notes: LocalCluster) -> None:
    # The position belongs to the client that wrote: another client reads replicas.
    router = make_router(notes, read_your_writes="lsn")
    async with (
        serve(create_app(router)) as url,
        httpx.AsyncClient(base_url=url) as writer,
        httpx.AsyncClient(base_url=url) as other,
    ):
        pause_all(notes)
        note = (await writer.post("/notes")).json()["id"]
        assert (await other.get(f"/notes/{note}")).status_code == 404
        assert (await writer.get(f"/notes/{note}")).status_code == 200


async def test_the_position_header_is_honoured_without_cookies(notes: LocalCluster) -> None:
    router = make_router(notes, read_your_writes="lsn")
    async with serve(create_app(router)) as url, httpx.AsyncClient(base_url=url) as client:
        pause_all(notes)
        created = await client.post("/notes")
        token = created.headers["x-replica-router-lsn"]
        client.cookies.clear()
        note = created.json()["id"]
        assert (await client.get(f"/notes/{note}")).status_code == 404
        read = await client.get(f"/notes/{note}", headers={"X-Replica-Router-LSN": token})
        assert read.status_code == 200


async def test_request_mode_reads_from_the_primary_after_a_write(notes: LocalCluster) -> None:
    for mode, expected in (("request", 200), ("lsn", 200), ("off", 404)):
        router = make_router(notes, read_your_writes=mode)
        async with (
            serve(create_app(router)) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            pause_all(notes)
            response = await client.post("/write-then-read")
            assert response.status_code == expected, (mode, response.text)
            if mode == "request":
                # Request mode pins one request only: the next one reads a replica.
                note = response.json()["id"]
                assert (await client.get(f"/notes/{note}")).status_code == 404
                reads = router.status().reads[0].decisions
                assert reads["primary_after_write"] == 1
        resume_all(notes)


async def test_a_writer_that_ran_nothing_sets_no_position(notes: LocalCluster) -> None:
    router = make_router(notes, read_your_writes="lsn")
    async with serve(create_app(router)) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/nothing")
        assert response.status_code == 200
        assert "x-replica-router-lsn" not in response.headers
        assert "rr_lsn" not in client.cookies


@BOTH_DRIVERS
async def test_forged_positions_are_ignored_without_waiting(notes: LocalCluster) -> None:
    # A wait bound of 3 s: honouring any of these would take at least that long,
    # or send the read to the primary.
    router = make_router(notes, read_your_writes="lsn", consistency_wait=3.0, lsn_secret=SECRET)
    other = ReplicaRouter(
        notes.primary_url, settings=settings(lsn_secret="another secret, 16+ characters")
    )
    async with serve(create_app(router)) as url, httpx.AsyncClient(base_url=url) as client:
        note = (await client.post("/notes")).json()["id"]
        legit = client.cookies["rr_lsn"]
        lsn = router.codec.decode(legit)
        assert lsn is not None
        forged = [
            router.codec.encode(2**64 - 1),  # validly signed, far beyond the primary
            other.codec.encode(lsn),  # a real position signed with another key
            legit.split(".")[0],  # the signature stripped
            legit[:-2] + ("AA" if not legit.endswith("AA") else "BB"),
            "not-a-position",
            "0/0",
            "FFFFFFFFF/0",
            "",
        ]
        notes.wait_for_replay()
        for token in forged:
            client.cookies.clear()
            started = time.monotonic()
            read = await client.get(f"/notes/{note}", headers={"X-Replica-Router-LSN": token})
            assert time.monotonic() - started < 2.0, token
            assert read.status_code == 200, token
            assert read.json()["replica"] is True, token
            # ... and the next request without it is a plain replica read too.
            assert (await client.get(f"/notes/{note}")).json()["replica"] is True
        decisions = router.status().reads[0].decisions
        assert decisions["primary_behind"] == 0
        assert decisions["replica_after_wait"] == 0
        assert decisions["token_ignored"] >= len(forged) - 2  # "" and "0/0" claim nothing
    await other.close()


async def test_a_job_carries_the_position_in_its_message(notes: LocalCluster) -> None:
    router = make_router(notes, read_your_writes="lsn")
    async with router:
        pause_all(notes)

        async def web_request() -> tuple[int, str | None]:
            async with router.writer_session() as db:
                note = (
                    await db.execute(text("INSERT INTO ryw_notes (body) VALUES ('j') RETURNING id"))
                ).scalar_one()
            return int(note), router.consistency_token()

        async def job(note: int, token: str | None) -> bool:
            # A new task: nothing of the web request's context comes along.
            async with router.reader_session(consistency_token=token) as db:
                found = await db.execute(
                    text("SELECT 1 FROM ryw_notes WHERE id = :id"), {"id": note}
                )
                return found.scalar() is not None

        note, token = await asyncio.create_task(web_request())
        assert token is not None
        assert await asyncio.create_task(job(note, token))
        assert not await asyncio.create_task(job(note, None))
        assert await router.run_read(lambda db: _exists(db, note), consistency_token=token)


async def _exists(db: Any, note: int) -> bool:
    found = await db.execute(text("SELECT 1 FROM ryw_notes WHERE id = :id"), {"id": note})
    return found.scalar() is not None


async def test_a_route_can_relax_consistency(notes: LocalCluster) -> None:
    router = make_router(notes, read_your_writes="lsn")
    async with serve(create_app(router)) as url, httpx.AsyncClient(base_url=url) as client:
        pause_all(notes)
        note = (await client.post("/notes")).json()["id"]
        assert (await client.get(f"/notes/{note}")).status_code == 200
        relaxed = await client.get(f"/relaxed/{note}")
        assert relaxed.status_code == 404  # this route accepts stale reads, on replicas
        reads = {r.name: r for r in router.status().reads}
        policy = reads["read_your_writes=off,max_lag_seconds=3600"]
        assert policy.decisions["replica"] == 1
        assert reads["default"].decisions["primary_behind"] == 1
        assert router.reader_with(
            read_your_writes="off", max_lag_seconds=3600
        ) is router.reader_with(read_your_writes="off", max_lag_seconds=3600)


async def test_explicit_middleware_and_secure_cookie(notes: LocalCluster) -> None:
    # Without the lifespan (ASGITransport), the middleware is added by hand.
    router = make_router(notes, read_your_writes="lsn")
    app = create_app(router)
    app.add_middleware(ReadYourWritesMiddleware, router=router)
    async with router:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            response = await c.post("/notes")
            cookie = response.headers["set-cookie"]
            assert cookie.startswith("rr_lsn=")
            assert "Secure" in cookie and "HttpOnly" in cookie and "Max-Age=300" in cookie


@pytest.fixture
def two_workers(notes: LocalCluster) -> Iterator[str]:
    """The test app under ``uvicorn --workers 2`` (real processes, one port)."""
    env = {
        "REPLICA_ROUTER_PRIMARY_URL": notes.primary_url,
        "REPLICA_ROUTER_REPLICA_URLS": ",".join(notes.replica_urls),
        "REPLICA_ROUTER_READ_YOUR_WRITES": "lsn",
        "REPLICA_ROUTER_LSN_SECRET": SECRET,
        "REPLICA_ROUTER_MAX_LAG_SECONDS": "3600",
        "REPLICA_ROUTER_MAX_LAG_BYTES": str(2**40),
        "REPLICA_ROUTER_CONSISTENCY_WAIT": "0.02",
        # Long probe intervals: a worker cannot have seen the other's write by probing.
        "REPLICA_ROUTER_HEALTH_INTERVAL": "30",
    }
    app = "tests.integration.ryw_app:create_app"
    with uvicorn_process(app, env, args=["--workers", "2"]) as (url, process):
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while len(pids) < 2:
            assert process.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, "two workers never answered"
            try:
                with httpx.Client(base_url=url) as client:
                    pids.add(client.post("/nothing").json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url


async def test_a_write_on_one_worker_is_read_back_through_the_other(
    notes: LocalCluster, two_workers: str
) -> None:
    pause_all(notes)
    crossed = 0
    for _ in range(10):
        # A new connection per request, so the kernel picks a worker each time.
        async with httpx.AsyncClient(base_url=two_workers) as client:
            created = await client.post("/notes")
        writer_pid, note = created.json()["pid"], created.json()["id"]
        cookie = created.cookies["rr_lsn"]
        for _ in range(50):
            async with httpx.AsyncClient(base_url=two_workers, cookies={"rr_lsn": cookie}) as c:
                read = await c.get(f"/notes/{note}")
            body = read.json()
            pid = body["pid"] if read.status_code == 200 else body["detail"]["pid"]
            if pid != writer_pid:
                assert read.status_code == 200, body
                crossed += 1
                break
    assert crossed >= 5, "the kernel kept sending reads to the writing worker"
    # Without the cookie, the other worker reads a paused replica: stale.
    async with httpx.AsyncClient(base_url=two_workers) as client:
        assert (await client.get(f"/notes/{note}")).status_code == 404


async def test_only_committed_writes_set_a_position(notes: LocalCluster) -> None:
    router = make_router(notes, read_your_writes="lsn")
    async with router:

        async def rolled_back() -> str | None:
            try:
                async with router.writer_session() as db:
                    await db.execute(text("INSERT INTO ryw_notes (body) VALUES ('no')"))
                    raise RuntimeError("the endpoint failed")
            except RuntimeError:
                pass
            return router.consistency_token()

        async def read_only() -> str | None:
            async with router.writer_session() as db:
                await db.execute(text("SELECT 1"))
            return router.consistency_token()

        async def committed() -> str | None:
            async with router.writer_session() as db:
                await db.execute(text("INSERT INTO ryw_notes (body) VALUES ('yes')"))
            return router.consistency_token()

        assert await asyncio.create_task(rolled_back()) is None
        # A transaction that only read still committed: it gets a (harmless) position.
        assert await asyncio.create_task(read_only()) is not None
        token = await asyncio.create_task(committed())
        assert token is not None
        current = notes.execute("primary", "SELECT pg_current_wal_insert_lsn()")[0][0]
        lsn = router.codec.decode(token)
        assert lsn is not None
        # The position covers the commit: at most the primary's position now.
        assert lsn <= (parse_lsn(current) or 0)


def slow_position(router: ReplicaRouter, pause: float) -> PrimaryPosition:
    """A position whose query reads the primary's position, then stays in flight for
    ``pause`` seconds (``pg_sleep`` after the position in its select list)."""
    slow = (
        "SELECT l FROM (SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
        f" AS l, pg_sleep({pause}) AS s) AS q"
    )
    return PrimaryPosition(
        probed=lambda: None,
        query=lambda: query_value(router.primary, slow, 10.0),
        timeout=10.0,
        observe=lambda lsn: None,
    )


async def test_a_position_read_before_a_commit_is_not_shared_after_it(notes: LocalCluster) -> None:
    """``PrimaryPosition.current`` shares one query among its callers (the position
    of a commit whose connection could not read it, a client's token checked against
    the primary). A query that was already running when a caller asked may have read
    the position before the commit (or the token) that caller must cover: sharing it
    would hand out a position that misses the write, and a later read could be stale."""
    router = make_router(notes)
    async with router:
        position = slow_position(router, 1.0)
        early = asyncio.create_task(position.current())
        await asyncio.sleep(0.3)  # its query has read the position and sleeps
        notes.execute("primary", "INSERT INTO ryw_notes (body) VALUES ('after the read')")
        committed = parse_lsn(notes.execute("primary", "SELECT pg_current_wal_insert_lsn()")[0][0])
        assert committed is not None
        late = await position.current()  # asked after the commit, while the query runs
        first = await early
        assert first is not None and first < committed, "the early query read it before"
        assert late is not None and late >= committed


async def test_a_cancelled_caller_takes_nobodys_position_with_it(notes: LocalCluster) -> None:
    """The caller that starts the shared position query may be cancelled (its request
    timed out, its client went away): the others waiting on that query still get the
    position, not "cannot be read" (which drops a client's valid token, or leaves a
    commit without its position)."""
    router = make_router(notes)
    async with router:
        position = slow_position(router, 0.5)
        first = asyncio.create_task(position.current())
        await asyncio.sleep(0.1)  # its query runs: the next two wait for the one after it
        starter = asyncio.create_task(position.current())
        joiner = asyncio.create_task(position.current())
        await first
        deadline = time.monotonic() + 10
        while position._started < 2:  # the starter started the second query
            assert time.monotonic() < deadline, "no second query"
            await asyncio.sleep(0.01)
        starter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starter
        assert await joiner is not None
