"""replica-router: read/write splitting for FastAPI and SQLAlchemy asyncio on PostgreSQL.

Example::

    from fastapi import Depends, FastAPI
    from sqlalchemy.ext.asyncio import AsyncSession
    from replica_router import ReplicaRouter

    router = ReplicaRouter.from_env()
    app = FastAPI(lifespan=router.lifespan)

    @app.get("/notes/{note_id}")
    async def read(note_id: int, db: AsyncSession = Depends(router.reader)): ...
"""

from ._consistency import ReadYourWritesMiddleware
from ._exceptions import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConsistencyTimeoutError,
    NoHealthyNodeError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    ReplicaRouterError,
    RetryExhaustedError,
)
from ._nodes import CHECKOUT_BUCKETS, Node, NodeState, Role
from ._retry import ErrorKind, classify
from ._router import ReplicaRouter
from ._selection import LeastInFlight, RandomChoice, RoundRobin, Selector, Weighted
from ._settings import RouterSettings
from ._status import NodeStatus, ReadPolicyStatus, RouterStatus

__all__ = [
    "CHECKOUT_BUCKETS",
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
    "ReplicaRouter",
    "ReplicaRouterError",
    "RetryExhaustedError",
    "Role",
    "RoundRobin",
    "RouterSettings",
    "RouterStatus",
    "Selector",
    "Weighted",
    "classify",
]

__version__ = "0.1.0"
