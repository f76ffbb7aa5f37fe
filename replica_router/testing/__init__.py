"""Throwaway PostgreSQL clusters (a primary and streaming replicas, or Patroni) for tests.

Example::

    from replica_router.testing import LocalCluster

    with LocalCluster(replicas=2) as cluster:
        router = ReplicaRouter(cluster.primary_url, replica_urls=cluster.replica_urls)
"""

from replica_router.testing._binaries import PostgresNotFoundError, find_pg_bin
from replica_router.testing.cluster import ClusterError, ClusterNode, LocalCluster
from replica_router.testing.patroni import PatroniCluster, PatroniMember, PatroniNotFoundError
from replica_router.testing.pgbouncer import PgBouncer, PgBouncerNotFoundError

__all__ = [
    "ClusterError",
    "ClusterNode",
    "LocalCluster",
    "PatroniCluster",
    "PatroniMember",
    "PatroniNotFoundError",
    "PgBouncer",
    "PgBouncerNotFoundError",
    "PostgresNotFoundError",
    "find_pg_bin",
]
