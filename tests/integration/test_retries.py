"""Safe retries and failover on real servers: no write applied twice, none reported falsely."""

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import (
    CommitNotSentError,
    CommitOutcomeUnknownError,
    ReplicaRouter,
    RetryExhaustedError,
    RouterSettings,
)
from replica_router.testing import LocalCluster
from replica_router.testing.pytest_plugin import DRIVERS

pytestmark = pytest.mark.integration
BOTH_DRIVERS = pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)

FAST = RouterSettings.defaults(
    health_interval=0.1, health_timeout=1.0, checkout_attempts=5, connect_timeout=1.0
)


async def test_primary_restart_during_concurrent_writes(replica_cluster: LocalCluster) -> None:
    replica_cluster.execute(
        "primary", "DROP TABLE IF EXISTS orders; CREATE TABLE orders (k text PRIMARY KEY)"
    )
    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as router:
        app = FastAPI()

        @app.post("/orders/{k}")
        async def create(
            k: str, db: Annotated[AsyncSession, Depends(router.writer)]
        ) -> dict[str, str]:
            await db.execute(text("INSERT INTO orders VALUES (:k)"), {"k": k})
            await asyncio.sleep(0.005)  # keep some requests inside the transaction
            return {"k": k}

        acknowledged: list[str] = []
        failed: list[str] = []
        in_flight_at_restart = 0
        in_flight = 0
        stop = asyncio.Event()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

        async def client(worker: int) -> None:
            nonlocal in_flight
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                n = 0
                while not stop.is_set():
                    key = f"w{worker}-{n}"
                    n += 1
                    in_flight += 1
                    try:
                        response = await http.post(f"/orders/{key}")
                    finally:
                        in_flight -= 1
                    (acknowledged if response.status_code == 200 else failed).append(key)

        workers = [asyncio.create_task(client(i)) for i in range(8)]
        await asyncio.sleep(0.5)
        in_flight_at_restart = in_flight
        await asyncio.to_thread(replica_cluster.restart_node, "primary")
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)

        # Writes work again without restarting the app.
        async with router.writer_session() as db:
            await db.execute(text("INSERT INTO orders VALUES ('after')"))

    rows = replica_cluster.execute("primary", "SELECT k FROM orders")
    stored = Counter(row[0] for row in rows)
    assert all(stored[k] == 1 for k in acknowledged), "an acknowledged write is missing"
    assert max(stored.values()) == 1  # nothing applied twice (the key is unique anyway)
    assert stored["after"] == 1
    assert set(stored) - {"after"} <= set(acknowledged) | set(failed)
    # Every request is either acknowledged (and stored) or got an error response.
    assert len(acknowledged) > 50
    print(
        f"\n{in_flight_at_restart} writes in flight at the restart; "
        f"{len(acknowledged)} acknowledged, {len(failed)} error responses"
    )
    assert in_flight_at_restart > 0


async def test_run_read_survives_killed_replicas(replica_cluster: LocalCluster) -> None:
    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST
    ) as router:

        async def read(db: AsyncSession) -> bool:
            return bool((await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one())

        stop = asyncio.Event()
        results: list[bool] = []

        async def loop() -> None:
            while not stop.is_set():
                results.append(await router.run_read(read))
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(loop()) for _ in range(6)]
        await asyncio.sleep(0.3)
        replica_cluster.kill_node("replica-1")
        await asyncio.sleep(0.3)
        replica_cluster.kill_node("replica-2")  # now only the primary is left
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)  # raises if any read failed
        assert True in results and False in results  # replicas first, then the primary


async def test_run_read_runs_a_read_again_after_its_connection_is_lost(
    replica_cluster: LocalCluster,
) -> None:
    # Deterministic: the first run kills its own backend mid-read, once.
    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST
    ) as router:
        runs: list[int] = []

        async def read(db: AsyncSession) -> int:
            port = int((await db.execute(text("SELECT inet_server_port()"))).scalar_one())
            runs.append(port)
            if len(runs) == 1:
                await db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            return port

        port = await router.run_read(read)
        assert len(runs) == 2  # run again, once
        assert port == runs[1] != runs[0]  # on another node
        status = {n.port: n.name for n in replica_cluster.nodes}
        assert not router.status().node(status[runs[0]]).healthy  # ejected at once


async def test_serialization_failures_are_rerun(replica_cluster: LocalCluster) -> None:
    replica_cluster.execute(
        "primary",
        "DROP TABLE IF EXISTS duty; CREATE TABLE duty (doctor text PRIMARY KEY, on_call bool);"
        "INSERT INTO duty VALUES ('a', true), ('b', true)",
    )
    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as router:

        async def scenario(attempts: int | None) -> list[BaseException | None]:
            barrier = asyncio.Barrier(2)
            runs: Counter[str] = Counter()

            def go_off_call(doctor: str) -> Callable[[AsyncSession], Awaitable[None]]:
                async def work(db: AsyncSession) -> None:
                    runs[doctor] += 1
                    on_call = (
                        await db.execute(text("SELECT count(*) FROM duty WHERE on_call"))
                    ).scalar_one()
                    if runs[doctor] == 1:
                        await barrier.wait()  # both read before either writes: write skew
                    if on_call >= 2:
                        await db.execute(
                            text("UPDATE duty SET on_call = false WHERE doctor = :d"),
                            {"d": doctor},
                        )

                return work

            return await asyncio.gather(
                *(
                    router.run_write(
                        go_off_call(d), isolation_level="SERIALIZABLE", attempts=attempts
                    )
                    for d in ("a", "b")
                ),
                return_exceptions=True,
            )

        outcomes = await scenario(attempts=None)
        assert outcomes == [None, None]
        # The invariant holds: one doctor is still on call.
        assert replica_cluster.execute("primary", "SELECT count(*) FROM duty WHERE on_call") == [
            ("1",)
        ]

        # Without the re-run the same scenario fails: proof the test can fail.
        replica_cluster.execute("primary", "UPDATE duty SET on_call = true")
        outcomes = await scenario(attempts=1)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], RetryExhaustedError)
        assert isinstance(errors[0].last_exception, DBAPIError)


async def test_a_cut_commit_is_reported_unknown_and_never_rerun(
    replica_cluster: LocalCluster,
) -> None:
    # A deferred constraint trigger sleeps at COMMIT; we kill the backend meanwhile.
    replica_cluster.execute(
        "primary",
        """
        DROP TABLE IF EXISTS ledger;
        CREATE TABLE ledger (v int);
        CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
        """,
    )
    async with ReplicaRouter(replica_cluster.primary_url, settings=FAST) as router:
        runs = 0

        async def write(db: AsyncSession) -> None:
            nonlocal runs
            runs += 1
            await db.execute(text("SELECT set_config('application_name', 'cut-me', false)"))
            await db.execute(text("INSERT INTO ledger VALUES (1)"))

        async def cut() -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                rows = await asyncio.to_thread(
                    replica_cluster.execute,
                    "primary",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'cut-me' AND query = 'COMMIT;'",
                )
                if rows:
                    return
                await asyncio.sleep(0.05)

        cutter = asyncio.create_task(cut())
        with pytest.raises(CommitOutcomeUnknownError):
            await router.run_write(write)
        await cutter
        assert runs == 1


async def test_writes_follow_a_promoted_replica(tmp_path: object) -> None:
    with LocalCluster(replicas=1) as cluster:
        old, new = cluster.primary, cluster.replicas[0]
        url = cluster.primary_url.replace(
            f"@127.0.0.1:{old.port}/app",
            f"@/app?host=127.0.0.1:{old.port}&host=127.0.0.1:{new.port}"
            "&target_session_attrs=read-write",
        )
        cluster.execute("primary", "CREATE TABLE events (v int)")
        cluster.wait_for_replay()
        async with ReplicaRouter(url, cluster.replica_urls, settings=FAST) as router:
            async with router.writer_session() as db:
                await db.execute(text("INSERT INTO events VALUES (1)"))
            cluster.stop_node(old)
            started = time.monotonic()
            cluster.promote(new)
            recovered = None
            while time.monotonic() - started < 30:
                try:
                    async with router.writer_session() as db:
                        await db.execute(text("INSERT INTO events VALUES (2)"))
                        port = (await db.execute(text("SELECT inet_server_port()"))).scalar_one()
                    recovered = time.monotonic() - started
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            assert recovered is not None, "writes did not resume on the promoted replica"
            assert port == new.port
            # The promoted node is no longer a replica for reads.
            await asyncio.sleep(0.5)
            status = router.status().node("replica-1")
            assert status.server_role == "primary"
            assert not status.healthy
            # Counted once, when the probe found the writable host had changed.
            assert router.status().primary.failovers == 1
            print(f"\nwrites resumed {recovered:.2f} s after the promotion began")
        assert cluster.execute(new, "SELECT count(*) FROM events") == [("2",)]


@BOTH_DRIVERS
async def test_a_commit_that_never_left_the_client_is_reported_not_committed(
    replica_cluster: LocalCluster,
) -> None:
    # The server ends the idle transaction (idle_in_transaction_session_timeout) before
    # COMMIT: the driver knows the connection is gone and never sends it.
    replica_cluster.execute("primary", "DROP TABLE IF EXISTS unsent; CREATE TABLE unsent (v int)")
    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST
    ) as router:

        async def write(db: AsyncSession, pause: bool) -> None:
            await db.execute(text("SET idle_in_transaction_session_timeout = '50ms'"))
            await db.execute(text("INSERT INTO unsent VALUES (1)"))
            if pause:
                await asyncio.sleep(0.5)

        with pytest.raises(CommitNotSentError):
            async with router.writer_session() as db:
                await write(db, pause=True)
        assert replica_cluster.execute("primary", "SELECT count(*) FROM unsent") == [("0",)]
        # Certainly not committed, so run_write may run it again.
        runs: list[int] = []

        async def once_slow(db: AsyncSession) -> None:
            runs.append(1)
            await write(db, pause=len(runs) == 1)

        await router.run_write(once_slow)
        assert len(runs) == 2
        assert replica_cluster.execute("primary", "SELECT count(*) FROM unsent") == [("1",)]


@BOTH_DRIVERS
async def test_a_node_lost_mid_request_is_a_503_with_retry_after(
    replica_cluster: LocalCluster,
) -> None:
    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=FAST
    ) as router:
        app = FastAPI()

        @app.post("/write")
        async def write(db: Annotated[AsyncSession, Depends(router.writer)]) -> None:
            # What a switchover does to a session: 57P01, terminating connection.
            await db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

        @app.get("/read")
        async def read(db: Annotated[AsyncSession, Depends(router.reader)]) -> None:
            await db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for response in (await http.post("/write"), await http.get("/read")):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
