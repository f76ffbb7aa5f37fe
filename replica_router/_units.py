"""Units of work that may run again: ``run_read`` and ``run_write``.

Nothing else in the router re-runs user code. A read is re-run on another node
after a lost connection or a recovery conflict on a replica; a transaction is
re-run only when it certainly did not commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from ._checkout import Checkout
from ._consistency import ConsistencyState, ReadPolicy
from ._exceptions import CommitOutcomeUnknownError, NoHealthyNodeError, RetryExhaustedError
from ._nodes import Node, Role
from ._reads import Reads
from ._retry import NODE_DOWN, ErrorKind, classify
from ._writes import IsolationLevel, Writes

__all__ = ["run_read", "run_write"]

T = TypeVar("T")

logger = logging.getLogger("replica_router")

_RERUN_TRANSACTION = frozenset({ErrorKind.SERIALIZATION, ErrorKind.DEADLOCK})


async def run_read(
    reads: Reads,
    fn: Callable[[AsyncSession], Awaitable[T]],
    policy: ReadPolicy,
    state: ConsistencyState | None,
    attempts: int,
) -> T:
    """Run ``fn`` on a reader, again on another node after a node failure."""
    tried: list[Node] = []
    for attempt in range(1, attempts + 1):
        before = len(tried)
        try:
            async with reads.session(tried, policy, state) as session:
                return await fn(session)
        except NoHealthyNodeError:
            raise  # the checkout already tried every node it could
        except Exception as exc:
            kind = classify(exc)
            node = tried[-1] if len(tried) > before else None
            # A read that timed out on a replica is safe to repeat elsewhere.
            retryable = kind in NODE_DOWN or (
                node is not None
                and node.role is Role.REPLICA
                and (kind in _RERUN_TRANSACTION or kind is ErrorKind.TIMEOUT)
            )
            if not retryable or node is None:
                raise
            node.state.retries += 1
            logger.info("read on %s failed (%s); running it again elsewhere", node.name, kind.value)
            if attempt == attempts:
                raise RetryExhaustedError(
                    f"the read failed on every node tried ({kind.value})",
                    last_exception=exc,
                    attempts=attempt,
                ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


async def run_write(
    writes: Writes,
    checkout: Checkout,
    primary: Callable[[], Node],
    fn: Callable[[AsyncSession], Awaitable[T]],
    isolation_level: IsolationLevel | None,
    attempts: int,
) -> T:
    """Run ``fn`` in a primary transaction and commit it; again only if it certainly
    did not commit."""
    for attempt in range(1, attempts + 1):
        try:
            async with writes.session(isolation_level) as session:
                return await fn(session)
        except (CommitOutcomeUnknownError, NoHealthyNodeError):
            # Unknown outcome: never again. No node: the checkout already retried.
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind not in _RERUN_TRANSACTION and kind not in NODE_DOWN:
                raise
            primary().state.retries += 1
            if attempt == attempts:
                raise RetryExhaustedError(
                    f"the transaction failed {attempt} times ({kind.value})",
                    last_exception=exc,
                    attempts=attempt,
                ) from exc
            logger.info("transaction rolled back (%s); running it again", kind.value)
            await asyncio.sleep(checkout.backoff(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
