"""The first-come-first-served pool, and the SQLAlchemy internals it relies on.

No server: the queue is exercised inside SQLAlchemy's greenlet bridge, as the pool
calls it; ``tests/integration/test_fairness.py`` runs it on real servers.
"""

import asyncio
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool
from sqlalchemy.util import concurrency
from sqlalchemy.util import queue as sa_queue

from replica_router import ReplicaRouter
from replica_router._pool import FairAsyncQueuePool, HandOffQueue

URL = "postgresql+asyncpg://u:pw@127.0.0.1:1/db"


def test_sqlalchemy_still_builds_its_queue_from_queue_class() -> None:
    # The one private hook the fair pool needs (QueuePool.__init__ reads it).
    assert "_queue_class" in vars(QueuePool)
    assert "_queue_class" in vars(AsyncAdaptedQueuePool)
    engine = create_async_engine(URL, poolclass=FairAsyncQueuePool, pool_size=3)
    pool = engine.sync_engine.pool
    assert isinstance(pool, FairAsyncQueuePool)
    assert isinstance(pool._pool, HandOffQueue)
    assert pool.size() == 3


def test_every_node_gets_the_fair_pool_unless_the_user_picks_one() -> None:
    router = ReplicaRouter(URL, [URL])
    assert all(isinstance(n.engine.sync_engine.pool, FairAsyncQueuePool) for n in router.nodes)
    mine = ReplicaRouter(URL, [URL], engine_options={"poolclass": AsyncAdaptedQueuePool})
    assert all(type(n.engine.sync_engine.pool) is AsyncAdaptedQueuePool for n in mine.nodes)


def test_a_pool_without_sizing_is_accepted() -> None:
    # NullPool refuses pool_size and friends: they apply to queue pools only.
    router = ReplicaRouter(URL, [URL], engine_options={"poolclass": NullPool})
    assert all(isinstance(n.engine.sync_engine.pool, NullPool) for n in router.nodes)


def test_put_and_get_without_waiters() -> None:
    queue: HandOffQueue[str] = HandOffQueue(maxsize=2)
    with pytest.raises(sa_queue.Empty):
        queue.get_nowait()
    queue.put("a", False)
    queue.put("b", False)
    assert queue.full() and queue.qsize() == 2
    with pytest.raises(sa_queue.Full):
        queue.put("c", False)
    assert queue.get(False) == "a"
    lifo: HandOffQueue[str] = HandOffQueue(maxsize=2, use_lifo=True)
    lifo.put("a")
    lifo.put("b")
    assert lifo.get() == "b"


async def get(queue: HandOffQueue[Any], timeout: float | None = None) -> Any:
    """``queue.get`` as the pool calls it: blocking, inside SQLAlchemy's greenlet."""
    return await concurrency.greenlet_spawn(queue.get, True, timeout)


async def test_a_returned_item_goes_to_the_oldest_waiter_not_to_a_newcomer() -> None:
    queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
    first = asyncio.create_task(get(queue))
    second = asyncio.create_task(get(queue))
    await asyncio.sleep(0)
    queue.put("x")
    # A newcomer asking in the same step finds nothing to take: it must wait its turn.
    with pytest.raises(sa_queue.Empty):
        queue.get_nowait()
    third = asyncio.create_task(get(queue))
    await asyncio.sleep(0)
    queue.put("y")
    queue.put("z")
    assert [await first, await second, await third] == ["x", "y", "z"]


async def test_a_waiter_times_out_with_empty_and_is_forgotten() -> None:
    queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
    with pytest.raises(sa_queue.Empty):
        await get(queue, timeout=0.01)
    assert not queue._waiters
    queue.put("a")
    assert queue.qsize() == 1  # kept, not handed to the waiter that gave up


async def test_an_item_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
    doomed = asyncio.create_task(get(queue))
    patient = asyncio.create_task(get(queue))
    await asyncio.sleep(0)
    queue.put("x")  # handed to ``doomed``...
    doomed.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert await patient == "x"  # the connection was not lost


async def test_a_turn_taken_outside_the_greenlet_is_held_for_the_next_get() -> None:
    # The router waits for its turn outside SQLAlchemy's greenlet, then checks out
    # without one: the entry it was handed must be the one its get() returns, ahead of
    # tasks that queued after it.
    queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
    turn = asyncio.create_task(queue.take_turn(None))
    await asyncio.sleep(0)
    later = asyncio.create_task(get(queue))
    await asyncio.sleep(0)
    queue.put("x")
    await turn
    assert queue.peek() == "x"
    assert queue.get(False) == "x"
    queue.put("y")
    assert await later == "y"


async def test_a_held_entry_whose_checkout_failed_is_handed_on() -> None:
    queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
    turn = asyncio.create_task(queue.take_turn(None))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(get(queue))
    await asyncio.sleep(0)
    queue.put("x")
    await turn
    queue.settle()  # the checkout failed before its get(): the next waiter has it
    assert await waiting == "x"
    assert queue.qsize() == 0


async def test_a_turn_times_out_with_empty_and_is_forgotten() -> None:
    queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
    with pytest.raises(sa_queue.Empty):
        await queue.take_turn(0.01)
    assert not queue._waiters
    queue.put("a")
    assert queue.qsize() == 1


def test_at_capacity_follows_the_pools_overflow() -> None:
    engine = create_async_engine(URL, poolclass=FairAsyncQueuePool, pool_size=1, max_overflow=0)
    pool = engine.sync_engine.pool
    assert isinstance(pool, FairAsyncQueuePool) and isinstance(pool._pool, HandOffQueue)
    assert not pool._pool.at_capacity(pool)  # nothing opened yet: a checkout connects
    pool._overflow = pool._max_overflow  # as after the one connection was opened
    assert pool._pool.at_capacity(pool)
    unlimited = create_async_engine(URL, poolclass=FairAsyncQueuePool, max_overflow=-1)
    pool = unlimited.sync_engine.pool
    assert isinstance(pool, FairAsyncQueuePool) and isinstance(pool._pool, HandOffQueue)
    pool._overflow = 100
    assert not pool._pool.at_capacity(pool)
