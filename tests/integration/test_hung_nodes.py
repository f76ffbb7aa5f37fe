"""A sick node never takes the others down (real faults under load).

* A primary that is frozen (SIGSTOP of all its processes) or killed: reads without a
  position, and reads whose position the replicas hold, stay on the replicas; writes
  fail within their bound and come back after; no acknowledged write is lost or doubled.
  The counter-proof measures lag against the vanished primary, as the router did before,
  and sees reads fail.
* A frozen replica: every read is bounded by READ_TIMEOUT plus the BEGIN bound, and
  ``run_read`` never fails; the replica serves again once it resumes.
"""

import asyncio
import contextvars
import os
import signal
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import ReplicaRouter, RouterSettings
from replica_router._health import HealthChecker
from replica_router._nodes import Node
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

OUTAGE = 8.0  # longer than the default 5 s lag bound
# A write that begins during the outage fails within 3 connect attempts of 1 s (with a
# 3 s CONNECT_TIMEOUT, a loaded machine's longer BEGIN bounds outlasted the outage, and
# the write succeeded once the primary was back).
SETTINGS = RouterSettings.defaults(health_interval=0.5, health_timeout=1.0, connect_timeout=1.0)
READ_TIMEOUT = 2.0


@pytest.fixture
def ledger(replica_cluster: LocalCluster) -> LocalCluster:
    # No unique key: a write applied twice would show as two rows.
    replica_cluster.execute(
        "primary", "DROP TABLE IF EXISTS ledger; CREATE TABLE ledger (k text NOT NULL)"
    )
    replica_cluster.wait_for_replay()
    return replica_cluster


@dataclass
class Load:
    """What the readers and writers saw."""

    reads: Counter[str] = field(default_factory=Counter)  # "replica" / "primary" / error
    positioned: Counter[str] = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)
    failed_writes: list[float] = field(default_factory=list)  # seconds each took
    writes_after: list[float] = field(default_factory=list)  # when acknowledged


async def run_load(
    router: ReplicaRouter,
    fault: "asyncio.Future[None]",
    stop: asyncio.Event,
    broken: asyncio.Event | None = None,
) -> Load:
    load = Load()
    async with router.writer_session() as db:  # a position every replica will hold
        await db.execute(text("INSERT INTO ledger VALUES ('seed')"))
    token = router.consistency_token()
    assert token is not None

    async def where(db: AsyncSession) -> str:
        recovery = (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
        return "replica" if recovery else "primary"

    async def reader(positioned: bool) -> None:
        counter = load.positioned if positioned else load.reads
        while not stop.is_set():
            try:
                async with router.reader_session(
                    consistency_token=token if positioned else None
                ) as db:
                    counter[await where(db)] += 1
            except Exception as exc:
                counter[type(exc).__name__] += 1
            await asyncio.sleep(0.01)

    async def writer(index: int, during_fault: bool = False) -> None:
        n = 0
        if during_fault:  # starts once the node is broken: some writes must begin then
            assert broken is not None
            await broken.wait()
        while not stop.is_set() and not (during_fault and fault.done()):
            key = f"{index}-{n}"
            n += 1
            started = time.monotonic()
            try:
                async with router.writer_session() as db:
                    await db.execute(text("INSERT INTO ledger VALUES (:k)"), {"k": key})
            except Exception:
                load.failed_writes.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
                continue
            load.acknowledged.append(key)
            if fault.done():
                load.writes_after.append(time.monotonic())
            await asyncio.sleep(0.01)

    # Each task in a context of its own (not a copy of this one, which holds the seed
    # write's position): readers without a position never wrote anything.
    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.create_task(coro, context=contextvars.Context())

    tasks = [spawn(reader(False)) for _ in range(4)]
    tasks += [spawn(reader(True)) for _ in range(2)]
    tasks += [spawn(writer(i)) for i in range(4)]  # often all in flight at the fault
    if broken is not None:
        tasks.append(spawn(writer(4, during_fault=True)))
    await asyncio.gather(*tasks)
    return load


async def outage(cluster: LocalCluster, how: str, router: ReplicaRouter) -> tuple[Load, float]:
    """Load, then the primary frozen or killed for OUTAGE seconds, then load again."""
    stop = asyncio.Event()
    broken = asyncio.Event()
    healed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(run_load(router, healed, stop, broken))
    await asyncio.sleep(1.0)
    # The hard case, made certain: the last commits before the outage never reached
    # the replicas (their WAL senders hung first), and the router saw their position.
    # Cluster controls run in a thread: blocking this loop (starting a server takes a
    # second) would expire the BEGIN bounds of reads in flight on healthy replicas.
    rows = await asyncio.to_thread(
        cluster.execute, "primary", "SELECT pid FROM pg_stat_replication"
    )
    senders = [int(pid) for (pid,) in rows]
    for pid in senders:
        os.kill(pid, signal.SIGSTOP)
    async with router.writer_session() as db:
        await db.execute(text("INSERT INTO ledger VALUES ('ahead')"))
    await asyncio.sleep(0.3)
    if how == "freeze":
        await asyncio.to_thread(cluster.freeze_node, "primary")
    else:
        await asyncio.to_thread(cluster.kill_node, "primary")
    # Writers in flight at the fault wait it out (a frozen primary may yet commit);
    # one that begins a write now must fail within its bounds.
    broken.set()
    await asyncio.sleep(OUTAGE)
    if how == "freeze":
        await asyncio.to_thread(cluster.thaw_node, "primary")  # the WAL senders too
    else:
        await asyncio.to_thread(cluster.start_node, "primary")
    back = time.monotonic()
    healed.set_result(None)
    await asyncio.sleep(3.0)
    stop.set()
    return await running, back


def check_writes(cluster: LocalCluster, load: Load) -> None:
    rows = Counter(k for (k,) in cluster.execute("primary", "SELECT k FROM ledger"))
    assert [k for k in load.acknowledged if rows[k] != 1] == []  # none lost, none doubled
    assert max(rows.values()) == 1


@pytest.mark.parametrize("how", ["freeze", "kill"])
async def test_reads_survive_a_hung_or_dead_primary(ledger: LocalCluster, how: str) -> None:
    async with ReplicaRouter(ledger.primary_url, ledger.replica_urls, settings=SETTINGS) as router:
        load, back = await outage(ledger, how, router)
    assert set(load.reads) == {"replica"}, load.reads  # 0 failed reads without a position
    assert set(load.positioned) == {"replica"}, load.positioned  # held by the replicas
    assert load.failed_writes, "writes should fail while the primary is away"
    bound = SETTINGS.checkout_timeout + SETTINGS.connect_timeout
    assert max(load.failed_writes) <= bound, load.failed_writes
    assert load.writes_after and min(load.writes_after) - back < 5.0  # writes resume
    check_writes(ledger, load)


async def test_counter_proof_lag_against_a_vanished_primary_fails_reads(
    ledger: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lag the router measured before: always against the primary's last position.
    def old_lag(self: HealthChecker, replica: Node, now: float) -> None:
        state = replica.state
        assert state.replay_lsn is not None
        state.lag_bytes, state.lag_seconds = self._history.lag(state.replay_lsn, now)

    monkeypatch.setattr(HealthChecker, "_measure_lag", old_lag)
    async with ReplicaRouter(ledger.primary_url, ledger.replica_urls, settings=SETTINGS) as router:
        load, _ = await outage(ledger, "freeze", router)
    assert set(load.reads) != {"replica"}, "reads should have failed without the fix"


async def test_a_frozen_replica_costs_a_bounded_wait(replica_cluster: LocalCluster) -> None:
    settings = RouterSettings.defaults(
        health_interval=0.5, health_timeout=1.0, read_timeout=READ_TIMEOUT, read_your_writes="off"
    )
    longest: list[float] = []
    failures: Counter[str] = Counter()
    served: Counter[int] = Counter()
    stop = asyncio.Event()
    frozen = replica_cluster.node("replica-1")

    async def port(db: AsyncSession) -> int:
        await db.execute(text("SELECT pg_sleep(0.002)"))
        return int((await db.execute(text("SELECT inet_server_port()"))).scalar_one())

    async with ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    ) as router:

        async def reader(unit: bool) -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if unit:
                        served[await router.run_read(port)] += 1
                    else:
                        async with router.reader_session() as db:
                            served[await port(db)] += 1
                except Exception as exc:
                    failures[("run_read " if unit else "reader ") + type(exc).__name__] += 1
                longest.append(time.monotonic() - started)

        tasks = [asyncio.create_task(reader(i % 2 == 0)) for i in range(16)]
        await asyncio.sleep(1.0)
        assert served[frozen.port] > 0
        replica_cluster.freeze_node(frozen)
        frozen_at = len(longest)
        await asyncio.sleep(OUTAGE)
        during = longest[frozen_at:]
        replica_cluster.thaw_node(frozen)
        before_thaw = served[frozen.port]
        deadline = time.monotonic() + 10
        while served[frozen.port] == before_thaw:  # back in service
            assert time.monotonic() < deadline, "the replica never served again"
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
    assert not [f for f in failures if f.startswith("run_read")], failures
    # A read caught mid-statement waits READ_TIMEOUT, then (run_read) moves on after at
    # most the BEGIN bound on the next node; none waits for the whole freeze.
    assert max(during) < READ_TIMEOUT + 1.5, sorted(during)[-5:]
