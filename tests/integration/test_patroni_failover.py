"""A Patroni-managed cluster changing its leader under load: a switchover, then a kill
of the leader's postmaster (real Patroni, etcd, PostgreSQL).

The router is configured as a user would: the primary is a multi-host URL over every
member (``target_session_attrs=read-write``), the replicas come from Patroni's REST API.
Asserted: no acknowledged write stored twice; acknowledged writes missing only if the
killed leader acknowledged them (asynchronous replication, reported); no read served by
a promoted node, also for sessions begun just before the promotion; every failure
one the client can act on (a 503's exception); writes back within Patroni's ttl plus a
bound; the old leader serving reads again once it rejoined; both failovers counted.
"""

import asyncio
import contextvars
import itertools
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import pytest
from sqlalchemy import text

from replica_router import (
    CommitNotSentError,
    CommitOutcomeUnknownError,
    NoHealthyNodeError,
    ReplicaRouter,
    RouterSettings,
)
from replica_router.fastapi import _lost
from replica_router.testing import PatroniCluster

pytestmark = pytest.mark.integration

# What a writer route turns into a 503 with Retry-After (or, for an unknown COMMIT, the
# only failure that is not one: counted apart).
ACTIONABLE = (NoHealthyNodeError, CommitNotSentError)
READERS = 4


async def test_switchover_and_leader_kill_under_load(patroni_cluster: PatroniCluster) -> None:
    cluster = patroni_cluster
    for member in cluster.members:
        if not cluster.is_running(member.name):
            cluster.start_node(member.name)
    cluster.wait_healthy()
    cluster.execute(
        cluster.wait_for_leader(),
        "DROP TABLE IF EXISTS moves; CREATE TABLE moves (k text NOT NULL)",
    )
    settings = RouterSettings.defaults(
        health_interval=0.5,
        health_timeout=1.0,
        read_your_writes="off",
        connect_timeout=2.0,
        patroni_url=",".join(cluster.patroni_urls),
    )
    acknowledged: list[tuple[str, float]] = []
    acknowledged_by: dict[str, int] = {}  # key -> the port of the server that took it
    failures: Counter[str] = Counter()
    bad_reads: list[int] = []
    reads: Counter[str] = Counter()
    stop = asyncio.Event()

    async with ReplicaRouter(cluster.primary_url, settings=settings) as router:

        async def writer(index: int) -> None:
            n = 0
            while not stop.is_set():
                key = f"{index}-{n}"
                n += 1
                try:
                    async with router.writer_session() as db:
                        port = (
                            await db.execute(
                                text("INSERT INTO moves VALUES (:k) RETURNING inet_server_port()"),
                                {"k": key},
                            )
                        ).scalar_one()
                    acknowledged.append((key, time.monotonic()))
                    acknowledged_by[key] = int(port)
                except CommitOutcomeUnknownError:
                    failures["outcome unknown"] += 1
                except ACTIONABLE as exc:
                    failures[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                except Exception as exc:
                    # What a writer route would answer: a node lost mid-statement is a 503.
                    if _lost(exc, None, writer=True) is not None:
                        failures[f"503 {type(exc).__name__}"] += 1
                    else:
                        failures[f"NOT ACTIONABLE {type(exc).__name__}: {exc}"[:120]] += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.01)

        async def reader() -> None:
            while not stop.is_set():
                try:
                    async with router.reader_session() as db:
                        row = (
                            await db.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))
                        ).one()
                        url = getattr(db.get_bind(), "url", None)
                        port = url.port if url is not None else None
                    # A session on a replica node (its URL has one port; the primary's is
                    # the multi-host URL) must be on a server in recovery.
                    if port is not None and not row[0]:
                        bad_reads.append(int(row[1]))
                    reads["replica" if row[0] else "primary"] += 1
                except ACTIONABLE as exc:
                    reads[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)
                except Exception as exc:
                    lost = _lost(exc, None, writer=False) is not None
                    reads[f"{'503' if lost else 'NOT ACTIONABLE'} {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.005)

        def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
            return asyncio.create_task(coro, context=contextvars.Context())

        tasks = [spawn(writer(i)) for i in range(4)] + [spawn(reader()) for _ in range(READERS)]
        await asyncio.sleep(2.0)

        old = cluster.leader()
        assert old is not None
        moved_at = time.monotonic()
        new = await asyncio.to_thread(cluster.switchover)
        await asyncio.sleep(2.0)
        switch_back = _longest_gap(acknowledged, moved_at, time.monotonic())

        killed_at = time.monotonic()
        killed = await asyncio.to_thread(cluster.kill_leader_postmaster)
        assert killed == new
        await asyncio.to_thread(cluster.wait_for_leader, 60.0, exclude=killed)
        await asyncio.sleep(3.0)
        kill_back = _longest_gap(acknowledged, killed_at, time.monotonic())

        # The leader before the switchover rejoined as a replica: it serves reads again.
        # (The killed one may still be rewinding; the next test waits for it.)
        rejoined = cluster.member(old).port
        deadline = time.monotonic() + 45
        served_by_old = False
        while not served_by_old and time.monotonic() < deadline:
            async with router.reader_session() as db:
                served_by_old = (
                    await db.execute(text("SELECT inet_server_port()"))
                ).scalar_one() == rejoined
        stop.set()
        await asyncio.gather(*tasks)
        failovers = router.status().primary.failovers
        # Rejoining is Patroni's part (a rewind may still run on a loaded machine): the
        # router's part is to read from it once it streams again.
        now_leader = await asyncio.to_thread(cluster.wait_for_leader)
        old_streams = old in await asyncio.to_thread(cluster.streaming, now_leader)

    leader = cluster.wait_for_leader()
    stored = Counter(k for (k,) in cluster.execute(leader, "SELECT k FROM moves"))
    missing = [k for k, at in acknowledged if stored[k] == 0]
    lost_by = Counter(
        next(m.name for m in cluster.members if m.port == acknowledged_by[k]) for k in missing
    )
    lost_at = [at - killed_at for k, at in acknowledged if stored[k] == 0]
    lost_span = f"{min(lost_at):+.2f}..{max(lost_at):+.2f} s" if lost_at else "-"
    print(
        f"\nswitchover {old}->{new}: writes out {switch_back:.2f} s; "
        f"kill of {killed}: writes out {kill_back:.2f} s; acknowledged {len(acknowledged)}, "
        f"missing {len(missing)} (acknowledged by {dict(lost_by)}, {lost_span} from the kill), "
        f"failures {dict(failures)}, "
        f"reads {dict(reads)}, reads served by a promoted node {len(bad_reads)}, "
        f"failovers counted {failovers}, old leader streaming {old_streams}, "
        f"served a read {served_by_old}"
    )
    assert max(stored.values()) == 1, "a write was stored twice"
    # Asynchronous replication: writes the killed leader acknowledged but had not yet
    # streamed may be lost (reported above); none that another server acknowledged. A
    # planned switchover loses nothing.
    assert set(lost_by) <= {killed}, f"lost writes acknowledged by {dict(lost_by)}"
    # No read is served by a node that left recovery: no session begins on one (the
    # checkout reads in_hot_standby), and a session begun just before the promotion has
    # its statement's result discarded (ReplicaPromotedError, a 503). Before the checkout
    # saw in_hot_standby, 3 to 59 reads went to each promoted node, for up to a health
    # interval; with the checkout only, about 3 per run straddled the promotion.
    assert bad_reads == [], f"reads served by a promoted node: {bad_reads}"
    assert not [f for f in failures if f.startswith("NOT ACTIONABLE")], failures
    assert not [r for r in reads if r.startswith("NOT ACTIONABLE")], reads
    assert switch_back < 10.0
    assert kill_back < cluster.ttl + 10.0
    assert served_by_old or not old_streams, "the old leader streams but never served a read"
    assert failovers >= 2


def _longest_gap(acknowledged: list[tuple[str, float]], start: float, end: float) -> float:
    """The longest time without an acknowledged write between ``start`` and ``end``: how
    long writes were out."""
    moments = [start, *sorted(at for _, at in acknowledged if start < at < end), end]
    return max(b - a for a, b in itertools.pairwise(moments))
