"""replica-router: read/write splitting for FastAPI and SQLAlchemy asyncio on PostgreSQL.

Example::

    from fastapi import Depends, FastAPI
    from sqlalchemy.ext.asyncio import AsyncSession
    from replica_router import ReplicaRouter

    router = ReplicaRouter.from_env()
    app = FastAPI(lifespan=router.lifespan)

    @app.get("/notes/{note_id}")
    async def read(note_id: int, db: AsyncSession = Depends(router.reader)): ...

Modules (private; each imports only those below it)::

    _router        ReplicaRouter, a facade over the parts below
    fastapi        dependencies and health routes, over callables
    _lifecycle     started or not; what it says about its set-up; start-up checks
    _units         run_read / run_write
    _writes        writer sessions, commit outcome, the commit's WAL position
    _reads         where a read is routed: fitness, positions, fallback, waits
    _checkout      a proven connection, retries, in-flight accounting
    _tracing       what a checkout tells a tracer; on or off, decided once
    _otel          the spans (the only module that imports OpenTelemetry)
    _consistency   positions, tokens, the middleware
    _health        probes and lag
    _selection     strategies
    _nodes         nodes, engines, sessionmakers
    _pool          first-come-first-served pools
    _retry         error classes
    _drivers       the driver seam
    _settings      settings
"""

from ._consistency import ReadYourWritesMiddleware
from ._exceptions import (
    CommitNotSentError,
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConsistencyTimeoutError,
    NoHealthyNodeError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    ReplicaPromotedError,
    ReplicaRouterError,
    RetryExhaustedError,
    SessionClosedError,
)
from ._nodes import Node, NodeState, Role
from ._retry import ErrorKind
from ._router import ReplicaRouter
from ._selection import LeastInFlight, RandomChoice, RoundRobin, Selector, Weighted
from ._settings import RouterSettings
from ._status import NodeStatus, ReadPolicyStatus, RouterStatus

__all__ = [
    "CommitNotSentError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConsistencyTimeoutError",
    "ErrorKind",
    "LeastInFlight",
    "NoHealthyNodeError",
    "NoHealthyReplicaError",
    "Node",
    "NodeState",
    "NodeStatus",
    "PrimaryUnavailableError",
    "RandomChoice",
    "ReadPolicyStatus",
    "ReadYourWritesMiddleware",
    "ReplicaPromotedError",
    "ReplicaRouter",
    "ReplicaRouterError",
    "RetryExhaustedError",
    "Role",
    "RoundRobin",
    "RouterSettings",
    "RouterStatus",
    "Selector",
    "SessionClosedError",
    "Weighted",
]

__version__ = "0.1.0"
