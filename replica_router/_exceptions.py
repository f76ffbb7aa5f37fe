"""Exceptions raised by replica-router.

The tree::

    ReplicaRouterError
    ├── ConfigurationError (also ValueError)
    ├── NoHealthyNodeError
    │   ├── NoHealthyReplicaError     a reader found no fit node (HTTP 503)
    │   │   └── ConsistencyTimeoutError   no replica replayed the client's write in time,
    │   │                                 and the primary may not serve reads
    │   └── PrimaryUnavailableError   the writer could not reach the primary
    ├── RetryExhaustedError           bounded retries ran out; keeps the last error
    ├── CommitOutcomeUnknownError     the connection was lost during COMMIT
    ├── CommitNotSentError            COMMIT never left the client: nothing committed
    ├── ReplicaPromotedError          a read ran on a replica just promoted: discarded
    └── SessionClosedError (also SQLAlchemy's InvalidRequestError)
                                      a dependency's session used after its request

Messages never contain a password: nodes are named, URLs are rendered masked.
"""

from __future__ import annotations

from sqlalchemy.exc import InvalidRequestError

__all__ = [
    "CommitNotSentError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConsistencyTimeoutError",
    "NoHealthyNodeError",
    "NoHealthyReplicaError",
    "PrimaryUnavailableError",
    "ReplicaPromotedError",
    "ReplicaRouterError",
    "RetryExhaustedError",
    "SessionClosedError",
]


class ReplicaRouterError(Exception):
    """Root of every error replica-router raises."""


class ConfigurationError(ReplicaRouterError, ValueError):
    """A setting is missing or malformed; the message names the variable."""


class NoHealthyNodeError(ReplicaRouterError):
    """No node could serve the session that was asked for.

    Attributes:
        retry_after: seconds after which a retry may succeed (the health interval).
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoHealthyReplicaError(NoHealthyNodeError):
    """A reader found no fit replica, and the primary was not allowed or is at its cap."""


class PrimaryUnavailableError(NoHealthyNodeError):
    """The writer could not get a working connection to the primary."""


class RetryExhaustedError(ReplicaRouterError):
    """Bounded retries ran out.

    Attributes:
        last_exception: the error of the last attempt (also the ``__cause__``).
        attempts: how many attempts were made.
    """

    def __init__(self, message: str, *, last_exception: BaseException, attempts: int) -> None:
        super().__init__(message)
        self.last_exception = last_exception
        self.attempts = attempts


class ConsistencyTimeoutError(NoHealthyReplicaError):
    """No replica replayed the client's WAL position within the wait bound, and the
    primary may not serve reads (``fallback_to_primary`` is off)."""


class CommitOutcomeUnknownError(ReplicaRouterError):
    """The connection was lost while COMMIT was in flight.

    The transaction may or may not have committed on the primary. It is never
    retried automatically: the caller must check, or make the write idempotent.
    """


class SessionClosedError(ReplicaRouterError, InvalidRequestError):
    """A session from ``router.writer`` or ``router.reader`` was used after it was closed.

    The writer's session closes (committed) before the response is sent, so a
    ``StreamingResponse`` body or a ``BackgroundTasks`` job that runs later needs a
    session of its own: ``async with router.writer_session() as db``. The message says
    which to use. It is also SQLAlchemy's ``InvalidRequestError``, which a closed
    session raises otherwise.
    """


class CommitNotSentError(ReplicaRouterError):
    """COMMIT never reached the server (the driver refused to send it on a connection
    it knew was broken): the transaction was certainly not committed.

    Safe to retry; ``run_write`` does, and a writer route answers 503 with Retry-After.
    """


class ReplicaPromotedError(ReplicaRouterError):
    """A reader's statement ran on a replica that had just been promoted: its result
    is discarded, so no read is ever served by a node that left recovery.

    Nothing was written (reader sessions are READ ONLY). Safe to retry; ``run_read``
    runs the read on another node, and a reader route answers 503 with Retry-After.
    """
