"""The public surface: what users import stays put."""

from __future__ import annotations

import replica_router


def test_exported_members() -> None:
    assert replica_router.__all__ == sorted(replica_router.__all__)
    for name in replica_router.__all__:
        assert getattr(replica_router, name) is not None


def test_exception_tree() -> None:
    r = replica_router
    assert issubclass(r.ConfigurationError, r.ReplicaRouterError)
    assert issubclass(r.ConfigurationError, ValueError)
    assert issubclass(r.NoHealthyReplicaError, r.NoHealthyNodeError)
    assert issubclass(r.PrimaryUnavailableError, r.NoHealthyNodeError)
    for name in ("RetryExhaustedError", "ConsistencyTimeoutError", "CommitOutcomeUnknownError"):
        assert issubclass(getattr(r, name), r.ReplicaRouterError)


def test_dependencies_are_stable_per_router() -> None:
    url = "postgresql://app:pw@127.0.0.1:1/app"
    a, b = replica_router.ReplicaRouter(url), replica_router.ReplicaRouter(url)
    assert a.writer is a.writer and a.reader is a.reader
    assert a.writer is not b.writer
