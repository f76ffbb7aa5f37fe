"""Health-aware selection under real faults: kills, lag, stopped replicas, misconfiguration."""

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from replica_router import NoHealthyReplicaError, ReplicaRouter, RouterSettings
from replica_router._retry import NODE_DOWN
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration


def settings(**values: object) -> RouterSettings:
    base: dict[str, object] = {"health_interval": 0.1, "health_timeout": 1.0, "readmit_after": 2}
    return RouterSettings.defaults(**{**base, **values})


async def port_of(db: AsyncSession) -> int:
    return int((await db.execute(text("SELECT inet_server_port()"))).scalar_one())


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
async def router(replica_cluster: LocalCluster) -> AsyncIterator[ReplicaRouter]:
    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings()
    ) as r:
        yield r


async def test_kill_a_replica_during_concurrent_reads(replica_cluster: LocalCluster) -> None:
    # Probes every 3 s: an ejection within 1 s of the kill is a request's, and the
    # reason says so (a probe's would name the probe's own error).
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=settings(health_interval=3.0),
    ) as router:
        await kill_under_reads(router, replica_cluster)


async def kill_under_reads(router: ReplicaRouter, replica_cluster: LocalCluster) -> None:
    killed = replica_cluster.node("replica-1")
    results: Counter[int] = Counter()
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            try:
                results[await router.run_read(port_of)] += 1
            except Exception as exc:  # counted: the assertion below wants none
                failures.append(exc)
            await asyncio.sleep(0.002)

    workers = [asyncio.create_task(reader()) for _ in range(8)]
    await asyncio.sleep(0.5)
    assert results[killed.port] > 0  # it was serving before the kill
    replica_cluster.kill_node(killed)
    # Marked down at once by the reads that hit it, not at the next probe.
    took = await wait_until(lambda: not router.status().node("replica-1").healthy, timeout=1.0)
    reason = router.status().node("replica-1").reason or ""
    assert reason.split(":")[1].strip() in {k.value for k in NODE_DOWN}, reason
    served_before_restart = results[killed.port]
    await asyncio.sleep(0.5)
    assert results[killed.port] == served_before_restart  # no read went there while down
    replica_cluster.start_node(killed)
    await wait_until(lambda: router.status().node("replica-1").healthy, timeout=20.0)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert results[killed.port] > served_before_restart  # readmitted and serving again
    assert took < 1.0


async def test_a_lagging_replica_stops_serving_and_comes_back(
    replica_cluster: LocalCluster,
) -> None:
    replica_cluster.execute("primary", "DROP TABLE IF EXISTS lag; CREATE TABLE lag (v int)")
    replica_cluster.wait_for_replay()
    lagging = replica_cluster.node("replica-1")
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        # Read-your-writes off: this task's own writes must not be what keeps reads
        # off the paused replica; only the lag bound may.
        settings=settings(max_lag_seconds=0.5, read_your_writes="off"),
    ) as router:
        replica_cluster.pause_replay(lagging)
        for i in range(20):  # keep writing while replay is paused
            async with router.writer_session() as db:
                await db.execute(text("INSERT INTO lag VALUES (:v)"), {"v": i})
            await asyncio.sleep(0.05)
        await wait_until(lambda: router.status().node("replica-1").reason == "lagging", 5.0)
        status = router.status().node("replica-1")
        assert not status.healthy
        assert status.lag_bytes and status.lag_bytes > 0
        ports = {await router.run_read(port_of) for _ in range(10)}
        assert ports == {replica_cluster.node("replica-2").port}
        replica_cluster.resume_replay(lagging)
        await wait_until(lambda: router.status().node("replica-1").healthy, 5.0)
        ports = {await router.run_read(port_of) for _ in range(10)}
        assert lagging.port in ports


async def test_an_idle_primary_does_not_make_replicas_lag(
    replica_cluster: LocalCluster,
) -> None:
    replica_cluster.wait_for_replay()
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=settings(max_lag_seconds=0.3),
    ) as router:
        await asyncio.sleep(1.5)  # five times the bound with nothing written
        for name in ("replica-1", "replica-2"):
            status = router.status().node(name)
            assert status.healthy, status
            assert status.lag_seconds == 0.0


async def test_all_replicas_stopped_fallback_guard_and_503(
    replica_cluster: LocalCluster,
) -> None:
    for node in replica_cluster.replicas:
        replica_cluster.stop_node(node)
    async with (
        ReplicaRouter(
            replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings()
        ) as router,
        router.reader_session() as db,
    ):
        assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is False

    # With the fallback off: 503 with Retry-After, before the endpoint runs.
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=settings(fallback_to_primary=False),
    ) as router:
        app = FastAPI()
        ran: list[int] = []

        @app.get("/read")
        async def read(db: AsyncSession = Depends(router.reader)) -> int:
            ran.append(1)
            return 1

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/read")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert "fallback to the primary is off" in response.json()["detail"]
        assert ran == []

    # With the guard at its cap: the excess gets a fast 503, the primary stays bounded.
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=settings(fallback_max_in_flight=3),
    ) as router:
        held = asyncio.Event()
        outcomes: list[str] = []

        async def hold() -> None:
            try:
                async with router.reader_session() as db:
                    await db.execute(text("SELECT 1"))
                    outcomes.append("served")
                    await held.wait()
            except NoHealthyReplicaError:
                outcomes.append("refused")

        tasks = [asyncio.create_task(hold()) for _ in range(10)]
        await wait_until(lambda: len(outcomes) == 10, 5.0)
        connections = replica_cluster.execute(
            "primary",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'replica-router'",
        )
        held.set()
        await asyncio.gather(*tasks)
        assert Counter(outcomes) == {"served": 3, "refused": 7}
        assert int(connections[0][0]) <= 3
        assert router.status().fallback_in_flight == 0


async def test_a_replica_that_is_really_a_primary_is_never_read(
    replica_cluster: LocalCluster,
) -> None:
    urls = [
        f"{replica_cluster.primary_url}?replica_name=not-a-replica",
        replica_cluster.replica_urls[0],
    ]
    async with ReplicaRouter(replica_cluster.primary_url, urls, settings=settings()) as router:
        ports = Counter([await router.run_read(port_of) for _ in range(20)])
        assert set(ports) == {replica_cluster.node("replica-1").port}
        status = router.status().node("not-a-replica")
        assert not status.healthy
        assert status.server_role == "primary"
        assert status.reason is not None and "not in recovery" in status.reason


async def test_probes_never_take_a_request_connection(replica_cluster: LocalCluster) -> None:
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=settings(health_interval=0.02, pool_size=1, max_overflow=0, pool_timeout=1.0),
    ) as router:
        probes_before = router._health.probes
        for _ in range(100):
            async with router.reader_session() as db:
                await db.execute(text("SELECT 1"))
            async with router.writer_session() as db:
                await db.execute(text("SELECT 1"))
        assert router._health.probes - probes_before > 10  # probes ran meanwhile
        for node in router.nodes:
            pool = node.engine.pool
            assert isinstance(pool, QueuePool)
            assert pool.size() == 1


async def test_a_stricter_lag_bound_for_one_read_is_honoured(
    replica_cluster: LocalCluster,
) -> None:
    replica_cluster.execute("primary", "DROP TABLE IF EXISTS lag2; CREATE TABLE lag2 (v int)")
    replica_cluster.wait_for_replay()
    behind = replica_cluster.node("replica-1")
    async with ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=settings(max_lag_seconds=60, read_your_writes="off"),
    ) as router:
        replica_cluster.pause_replay(behind)
        for i in range(10):
            async with router.writer_session() as db:
                await db.execute(text("INSERT INTO lag2 VALUES (:v)"), {"v": i})
        await wait_until(lambda: (router.status().node("replica-1").lag_seconds or 0) > 0.5)
        # Within the router's 60 s bound: plain reads still use it...
        relaxed = {await router.run_read(port_of) for _ in range(10)}
        assert behind.port in relaxed
        # ...a read that asks for at most 0.2 s never does.
        strict = {await router.run_read(port_of, max_lag_seconds=0.2) for _ in range(10)}
        assert strict == {replica_cluster.node("replica-2").port}


async def test_a_writable_server_listed_as_a_replica_still_refuses_writes(
    replica_cluster: LocalCluster,
) -> None:
    # Before any probe (the router is not started) the router cannot know the "replica"
    # is a primary: the READ ONLY set on its connections at connect is what stops the
    # write (the real standbys refuse writes anyway, so only this shows the hook works).
    from sqlalchemy.exc import DBAPIError

    writable = f"{replica_cluster.primary_url}?replica_name=writable"
    router = ReplicaRouter(replica_cluster.primary_url, [writable], settings=settings())
    try:
        async with router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is False
            with pytest.raises(DBAPIError) as caught:
                await db.execute(text("CREATE TABLE must_not_exist (v int)"))
        assert getattr(caught.value.orig, "sqlstate", None) == "25006"
    finally:
        await router.close()
