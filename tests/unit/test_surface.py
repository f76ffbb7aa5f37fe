"""The public surface: what users import stays put."""

from __future__ import annotations

import replica_router

EXPORTED = [
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


def test_exported_members() -> None:
    assert replica_router.__all__ == EXPORTED
    for name in replica_router.__all__:
        assert getattr(replica_router, name) is not None
    public = {name for name in vars(replica_router) if not name.startswith("_")}
    modules = {"fastapi", "metrics", "otel", "testing", "cli"}
    assert public - modules == set(EXPORTED)


def test_internals_stay_in_their_modules() -> None:
    # Importable where they live, for metrics and tests; not the package's surface.
    from replica_router._nodes import CHECKOUT_BUCKETS
    from replica_router._retry import classify

    assert CHECKOUT_BUCKETS
    assert callable(classify)
    for name in ("CHECKOUT_BUCKETS", "classify"):
        assert name not in replica_router.__all__
        assert not hasattr(replica_router, name)


def test_exception_tree() -> None:
    r = replica_router
    assert issubclass(r.ConfigurationError, r.ReplicaRouterError)
    assert issubclass(r.ConfigurationError, ValueError)
    assert issubclass(r.NoHealthyReplicaError, r.NoHealthyNodeError)
    assert issubclass(r.PrimaryUnavailableError, r.NoHealthyNodeError)
    names = (
        "RetryExhaustedError",
        "ConsistencyTimeoutError",
        "CommitOutcomeUnknownError",
        "CommitNotSentError",
        "ReplicaPromotedError",
        "SessionClosedError",
    )
    for name in names:
        assert issubclass(getattr(r, name), r.ReplicaRouterError)


def test_dependencies_are_stable_per_router() -> None:
    url = "postgresql://app:pw@127.0.0.1:1/app"
    a, b = replica_router.ReplicaRouter(url), replica_router.ReplicaRouter(url)
    assert a.writer is a.writer and a.reader is a.reader
    assert a.writer is not b.writer
