"""A blocked event loop is not a sick replica (checkouts, health probes, statements).

A synchronous or CPU-bound call in any task stalls the whole loop. A checkout's BEGIN
bound (at least 0.25 s) under ``asyncio.timeout`` then fires late, on resume, and
cancels the task although the loop has just read the answer (the task's wake-up runs
after the overdue timer). Blaming the node ejected healthy replicas and sent every
read to the primary whenever an application blocked its loop for a quarter of a
second. Now asyncpg's BEGIN runs under asyncpg's own timer, which does nothing once
the answer is in; psycopg's keeps ``asyncio.timeout``, and a timeout that fired late
is retried on the same node with nobody marked down. The counter-proofs, with the old
timer on asyncpg and the lateness check off on psycopg, show the ejection.

The stall is made for real: the replica is frozen (SIGSTOP) while the BEGIN is in
flight, a thread thaws it 50 ms later, and the test blocks the loop for 0.6 s, so the
answer is in the socket long before the loop looks.
"""

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from sqlalchemy import text

from replica_router import ReplicaRouter, RouterSettings, _retry
from replica_router._drivers import AsyncpgDriver
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

# Probes once at start, then (practically) never: only the checkout can judge.
NO_PROBES = RouterSettings.defaults(health_interval=3600, read_your_writes="off")


async def a_read_across_a_blocked_loop(cluster: LocalCluster) -> tuple[str, bool, int]:
    """Where the read ran, whether replica-1 is healthy after, and its failure count."""
    async with ReplicaRouter(
        cluster.primary_url, cluster.replica_urls[:1], settings=NO_PROBES
    ) as router:
        for _ in range(5):  # a known latency: the BEGIN bound is its 0.25 s floor
            async with router.reader_session() as db:
                await db.execute(text("SELECT 1"))

        async def read() -> str:
            async with router.reader_session() as db:
                recovery = (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
                return "replica" if recovery else "primary"

        thaw = threading.Timer(0.05, cluster.thaw_node, ["replica-1"])
        cluster.freeze_node("replica-1")
        try:
            task = asyncio.create_task(read())
            await asyncio.sleep(0.05)  # the BEGIN is sent; the frozen server holds it
            thaw.start()
            time.sleep(0.6)  # noqa: ASYNC251 - the application blocks its loop
        finally:
            thaw.cancel()
            cluster.thaw_node("replica-1")  # idempotent; never leave it frozen
        where = await task
        node = router.status().node("replica-1")
        return where, node.healthy, router.replicas[0].state.checkout_failures


@pytest.mark.parametrize("replica_cluster", ["asyncpg", "psycopg"], indirect=True)
async def test_a_blocked_loop_neither_ejects_the_replica_nor_moves_the_read(
    replica_cluster: LocalCluster,
) -> None:
    where, healthy, failures = await a_read_across_a_blocked_loop(replica_cluster)
    assert (where, healthy, failures) == ("replica", True, 0)


@pytest.mark.parametrize("replica_cluster", ["asyncpg", "psycopg"], indirect=True)
async def test_counter_proof_blaming_the_node_ejects_a_healthy_replica(
    replica_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_retry, "_LOOP_BLOCKED", float("inf"))
    if replica_cluster.driver == "asyncpg":
        begin = AsyncpgDriver.begin

        async def begin_under_asyncio_timeout(
            self: AsyncpgDriver, connection: Any, seconds: float
        ) -> None:
            async with asyncio.timeout(seconds):  # the bound as it was
                await begin(self, connection, 3600.0)

        monkeypatch.setattr(AsyncpgDriver, "begin", begin_under_asyncio_timeout)
    where, healthy, failures = await a_read_across_a_blocked_loop(replica_cluster)
    assert (where, healthy, failures) == ("primary", False, 1)


async def a_probe_across_a_blocked_loop(cluster: LocalCluster, probes: int) -> bool:
    """Whether replica-1 is still up after ``probes`` probes, each cut by a blocked loop."""
    settings = RouterSettings.defaults(
        health_interval=3600, health_timeout=0.3, read_your_writes="off"
    )
    async with ReplicaRouter(
        cluster.primary_url, cluster.replica_urls[:1], settings=settings
    ) as router:
        node = router.replicas[0]
        assert node.state.up
        for _ in range(probes):
            thaw = threading.Timer(0.05, cluster.thaw_node, ["replica-1"])
            cluster.freeze_node("replica-1")
            try:
                probe = asyncio.create_task(router._health.probe(node))
                await asyncio.sleep(0.05)  # the probe's query is sent
                thaw.start()
                time.sleep(0.6)  # noqa: ASYNC251 - past the probe's 0.3 s bound
            finally:
                thaw.cancel()
                cluster.thaw_node("replica-1")
            await probe
        return node.state.up


async def test_a_probe_cut_by_a_blocked_loop_does_not_mark_the_replica_down(
    replica_cluster: LocalCluster,
) -> None:
    assert await a_probe_across_a_blocked_loop(replica_cluster, probes=1)


async def test_two_cut_probes_in_a_row_do_mark_it_down(replica_cluster: LocalCluster) -> None:
    # A loop that is always late must not hide a node that really hangs.
    assert not await a_probe_across_a_blocked_loop(replica_cluster, probes=2)


async def test_counter_proof_a_probe_cut_by_a_blocked_loop_marked_the_replica_down(
    replica_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_retry, "_LOOP_BLOCKED", float("inf"))
    assert not await a_probe_across_a_blocked_loop(replica_cluster, probes=1)


def a_statement_across_a_blocked_loop(
    cluster: LocalCluster, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> tuple[str, bool, int]:
    """A reader's statement in flight while the loop is blocked past ``READ_TIMEOUT``:
    what it gave, whether replica-1 is healthy after, and its failure count."""
    settings = RouterSettings.defaults(
        health_interval=3600, read_your_writes="off", read_timeout=0.3
    )

    async def scenario() -> tuple[str, bool, int]:
        async with ReplicaRouter(
            cluster.primary_url, cluster.replica_urls[:1], settings=settings
        ) as router:
            outcome = "answered"
            try:
                async with router.reader_session() as db:
                    thaw = threading.Timer(0.05, cluster.thaw_node, ["replica-1"])
                    cluster.freeze_node("replica-1")
                    try:
                        statement = asyncio.ensure_future(db.execute(text("SELECT 1")))
                        await asyncio.sleep(0.02)  # sent; the frozen server holds it
                        thaw.start()
                        time.sleep(0.6)  # noqa: ASYNC251 - the application blocks its loop
                    finally:
                        thaw.cancel()
                        cluster.thaw_node("replica-1")
                    await statement
            except TimeoutError:
                outcome = "cut"
            node = router.status().node("replica-1")
            return outcome, node.healthy, router.replicas[0].state.checkout_failures

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(scenario())


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_statement_in_flight_across_a_blocked_loop_is_answered(
    replica_cluster: LocalCluster, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    # Unlike the checkout's asyncio.timeout, which cancels a task whose answer is
    # already read, asyncpg's own statement timer (READ_TIMEOUT) does nothing once the
    # answer is in; and after a task blocked the loop, both loops poll the socket
    # before they run overdue timers. So no statement is cut, and no replica ejected,
    # by a blocked loop: this pins it (the README says so), on either loop.
    assert a_statement_across_a_blocked_loop(replica_cluster, new_loop) == ("answered", True, 0)
