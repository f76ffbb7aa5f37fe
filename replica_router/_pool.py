"""A connection pool that serves waiters first come, first served.

SQLAlchemy's ``AsyncAdaptedQueuePool`` keeps idle connections in an
``asyncio.Queue``. A returned connection wakes the oldest waiter but stays in the
queue, and any task that asks before that waiter runs takes it; the woken waiter
queues again at the back. Under contention (more sessions than connections) a task
that returns a connection and asks again in the same loop step keeps winning, and
a waiter can lose until the pool timeout.

:class:`FairAsyncQueuePool` hands a returned connection straight to the oldest
waiter; the idle list is used only while nobody waits. It relies on one private
hook of SQLAlchemy, ``QueuePool._queue_class`` (present since SQLAlchemy 1.4;
``tests/unit/test_pool.py`` pins it).

Example::

    engine = create_async_engine(url, poolclass=FairAsyncQueuePool, pool_size=10)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool
from sqlalchemy.util import concurrency as _concurrency
from sqlalchemy.util import queue as _sa_queue

__all__ = ["FairAsyncQueuePool", "HandOffQueue"]

T = TypeVar("T")

# SQLAlchemy 2.1 renamed await_only to await_; 2.0 has only the old name.
_await: Callable[[Awaitable[Any]], Any] = (
    getattr(_concurrency, "await_", None) or _concurrency.await_only
)


class HandOffQueue(_sa_queue.QueueCommon[T]):
    """SQLAlchemy's pool queue interface, first come, first served.

    ``put`` gives the item to the oldest waiting ``get`` if there is one, else keeps
    it; ``get`` takes a kept item only when nobody is waiting before it. Blocking
    ``get`` runs inside SQLAlchemy's greenlet, like ``AsyncAdaptedQueue``.
    """

    __slots__ = ("_items", "_waiters", "maxsize", "use_lifo")

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._items: deque[T] = deque()
        self._waiters: deque[asyncio.Future[T]] = deque()

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    # The methods SQLAlchemy's pool calls (``put``, ``get``) hold the work themselves:
    # every checkout and checkin of every node runs them.

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        # Never blocks: a pool never holds more than maxsize idle entries.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a waiter that timed out or was cancelled is skipped
                waiter.set_result(item)
                return
        if 0 < self.maxsize <= len(self._items):
            raise _sa_queue.Full()
        self._items.append(item)

    def put_nowait(self, item: T) -> None:
        self.put(item)

    def takes_without_closing(self) -> bool:
        """Whether an entry put now is kept or handed on (a full pool closes it)."""
        if self._waiters:
            return True
        maxsize = self.maxsize
        return maxsize <= 0 or len(self._items) < maxsize

    def peek(self) -> T | None:
        """The entry ``get`` would return now without waiting, left in place."""
        items = self._items
        if not items:
            return None
        return items[-1] if self.use_lifo else items[0]

    def at_capacity(self, pool: QueuePool) -> bool:
        """Whether ``pool`` (this queue's) has no idle entry and may open no more, so a
        checkout has to wait for a returned one."""
        return not self._items and -1 < pool._max_overflow <= pool._overflow

    async def take_turn(self, seconds: float | None) -> None:
        """Wait, first come, first served, until a returned entry is this task's, and
        hold it for the task's next ``get``: the checkout that follows awaits nothing,
        so it can run outside SQLAlchemy's greenlet. ``Empty`` after ``seconds``."""
        item = await self._wait(seconds)
        self._hold(item)

    def _hold(self, item: T) -> None:
        # Where ``get`` takes the next one; nothing else runs before it does.
        if self.use_lifo:
            self._items.append(item)
        else:
            self._items.appendleft(item)

    def settle(self) -> None:
        """Hand a held entry on if its checkout failed before taking it."""
        items, waiters = self._items, self._waiters
        while items and waiters:
            self.put(items.pop() if self.use_lifo else items.popleft())

    def get_nowait(self) -> T:
        return self.get(block=False)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        items = self._items
        if items:
            return items.pop() if self.use_lifo else items.popleft()
        if not block:
            raise _sa_queue.Empty()
        result: T = _await(self._wait(timeout))
        return result

    async def _wait(self, seconds: float | None) -> T:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._waiters.append(waiter)
        # A timer that fails the waiter, not asyncio.timeout: a timer costs about a
        # third as much, and every contended checkout waits here.
        timer = None if seconds is None else loop.call_later(seconds, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed an item in the same step we were cancelled: pass it on
                # rather than lose a connection.
                self.put_nowait(waiter.result())
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_sa_queue.Empty())


class FairAsyncQueuePool(AsyncAdaptedQueuePool):
    """``AsyncAdaptedQueuePool`` whose waiters are served in arrival order.

    The default pool of every node; pass ``poolclass=`` in ``engine_options`` to
    use another.
    """

    _queue_class: type[_sa_queue.QueueCommon[ConnectionPoolEntry]] = HandOffQueue
