"""Pytest fixtures on a real local cluster; enable them in your own suite with::

    # conftest.py
    pytest_plugins = ["replica_router.testing.pytest_plugin"]

Fixtures:

* ``replica_cluster`` (session): a :class:`LocalCluster` with a primary and
  ``REPLICA_ROUTER_TEST_REPLICAS`` (default 2) streaming replicas, started once.
  Each test gets it healed: every server running, replay resumed. With
  ``REPLICA_ROUTER_TEST_CLUSTER=docker`` it is a
  :class:`~replica_router.testing.containers.DockerCluster` instead (the
  ``testcontainers`` extra and a Docker engine; ``REPLICA_ROUTER_TEST_IMAGE``
  picks the image).
  Its URLs use asyncpg, or psycopg 3 with ``REPLICA_ROUTER_TEST_DRIVER=psycopg``
  or ``@pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)``.
* ``replica_router`` (function): a started :class:`ReplicaRouter` over that
  cluster with fast health checks, closed after the test.
* ``pgbouncer`` (session): a :class:`~replica_router.testing.PgBouncer` in
  transaction pooling mode in front of every server of that cluster, started
  the first time a test asks for it. Skipped when no ``pgbouncer`` binary is
  found (see ``REPLICA_ROUTER_PGBOUNCER``) or the cluster is not local.
* ``patroni_cluster`` (session): a :class:`~replica_router.testing.PatroniCluster`
  (etcd and three Patroni members), started the first time a test asks for it
  and shared by the session: a test that crashes members should start them
  again (``start_node``) and ``wait_healthy()``. Skipped when Patroni or etcd is
  missing (``pip install 'replica-router[patroni]'``).

Async tests and fixtures need pytest-asyncio in auto mode: ``pip install
'replica-router[testing]'`` and ``asyncio_mode = "auto"`` under
``[tool.pytest.ini_options]``. To point an app at the cluster:
``router.override_for_tests(app, replica_router)`` (see the README's "Testing your app").

Example::

    from sqlalchemy import text

    async def test_reads_go_to_replicas(replica_router):
        async with replica_router.reader_session() as db:
            assert (await db.execute(text("SELECT pg_is_in_recovery()"))).scalar()
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing._base import DRIVERS
from replica_router.testing.cluster import LocalCluster
from replica_router.testing.containers import DEFAULT_IMAGE, DockerCluster
from replica_router.testing.patroni import PatroniCluster, PatroniNotFoundError
from replica_router.testing.pgbouncer import PgBouncer, PgBouncerNotFoundError

__all__ = [
    "DRIVERS",
    "DRIVER_ENV",
    "heal",
    "patroni_cluster",
    "pgbouncer",
    "replica_cluster",
    "replica_router",
    "replica_router_cluster",
]


DRIVER_ENV = "REPLICA_ROUTER_TEST_DRIVER"


def heal(cluster: LocalCluster | DockerCluster) -> None:
    """Undo faults a test left: start stopped servers, resume paused replay."""
    # By name: either backend takes a name (a node object only of its own kind).
    if isinstance(cluster, LocalCluster):
        for name in [n.name for n in cluster.nodes if cluster.is_frozen(n.name)]:
            cluster.thaw_node(name)
    for node in cluster.nodes:
        if not cluster.is_running(node.name):
            cluster.start_node(node.name)
    for node in cluster.replicas:
        if node.role == "replica":
            cluster.resume_replay(node.name)


def _new_cluster() -> LocalCluster | DockerCluster:
    replicas = int(os.environ.get("REPLICA_ROUTER_TEST_REPLICAS", "2"))
    kind = os.environ.get("REPLICA_ROUTER_TEST_CLUSTER", "local")
    if kind == "docker":
        image = os.environ.get("REPLICA_ROUTER_TEST_IMAGE", DEFAULT_IMAGE)
        return DockerCluster(replicas=replicas, image=image)
    if kind != "local":
        msg = f"REPLICA_ROUTER_TEST_CLUSTER must be 'local' or 'docker', got {kind!r}"
        raise pytest.UsageError(msg)
    return LocalCluster(replicas=replicas)


@pytest.fixture(scope="session")
def replica_router_cluster() -> Iterator[LocalCluster | DockerCluster]:
    """The session's cluster, started once and stopped at the end."""
    with _new_cluster() as cluster:
        yield cluster


@pytest.fixture
def replica_cluster(
    request: pytest.FixtureRequest, replica_router_cluster: LocalCluster | DockerCluster
) -> Iterator[LocalCluster | DockerCluster]:
    """The session's cluster, healed of faults left by earlier tests.

    Its URLs name the driver given by indirect parametrization
    (``@pytest.mark.parametrize("replica_cluster", DRIVERS, indirect=True)``), else by
    ``REPLICA_ROUTER_TEST_DRIVER`` (``asyncpg`` by default, or ``psycopg``).
    """
    driver = getattr(request, "param", None) or os.environ.get(DRIVER_ENV, "asyncpg")
    if driver not in DRIVERS:
        msg = f"{DRIVER_ENV} (or the parameter) must be one of {DRIVERS}, got {driver!r}"
        raise pytest.UsageError(msg)
    if driver == "psycopg":
        pytest.importorskip("psycopg", reason="psycopg 3 is not installed (extra: psycopg)")
    heal(replica_router_cluster)
    replica_router_cluster.driver = driver
    try:
        yield replica_router_cluster
    finally:
        replica_router_cluster.driver = "asyncpg"


@pytest_asyncio.fixture
async def replica_router(
    replica_cluster: LocalCluster | DockerCluster,
) -> AsyncIterator[ReplicaRouter]:
    """A started router over the cluster with fast probes (0.2 s), closed afterwards."""
    settings = RouterSettings.defaults(health_interval=0.2, health_timeout=1.0)
    router = ReplicaRouter(
        replica_cluster.primary_url, replica_cluster.replica_urls, settings=settings
    )
    async with router:
        yield router


@pytest.fixture(scope="session")
def pgbouncer(replica_router_cluster: LocalCluster | DockerCluster) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling) in front of every server of the session's cluster."""
    if not isinstance(replica_router_cluster, LocalCluster):
        pytest.skip("the pgbouncer fixture fronts a LocalCluster only")
    try:
        bouncer = PgBouncer(replica_router_cluster).start()
    except PgBouncerNotFoundError as exc:
        pytest.skip(str(exc))
    with bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """A Patroni cluster (etcd and three members) for the session; skipped without Patroni."""
    cluster = PatroniCluster()
    try:
        cluster.start()
    except PatroniNotFoundError as exc:
        pytest.skip(f"patroni_cluster: {exc}")
    with cluster:
        yield cluster
