"""Topology that changes under the router: a promoted replica is seen at checkout."""

from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from replica_router import ReplicaRouter, RouterSettings
from replica_router._drivers import AsyncpgDriver
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

# Probes once at start, then (practically) never: only the checkout can notice.
NO_PROBES = RouterSettings.defaults(health_interval=3600, read_your_writes="off")


@pytest.fixture
def own_cluster(tmp_path: object) -> Iterator[LocalCluster]:
    with LocalCluster(replicas=2) as cluster:
        cluster.wait_for_replay()  # the only probe must find both replicas caught up
        yield cluster


async def where(db: AsyncSession) -> str:
    row = (await db.execute(text("SELECT pg_is_in_recovery(), inet_server_port()"))).one()
    return f"{'replica' if row[0] else 'primary'}:{row[1]}"


async def reads_after_a_promotion(cluster: LocalCluster) -> Counter[str]:
    async with ReplicaRouter(cluster.primary_url, cluster.replica_urls, settings=NO_PROBES) as r:
        before: Counter[str] = Counter()
        for _ in range(20):  # pooled connections to both replicas
            async with r.reader_session() as db:
                before[await where(db)] += 1
        assert before[f"replica:{cluster.node('replica-1').port}"] > 0, before
        cluster.promote("replica-1")
        seen: Counter[str] = Counter()
        for _ in range(40):
            async with r.reader_session() as db:
                seen[await where(db)] += 1
        seen["healthy" if r.status().node("replica-1").healthy else "ejected"] += 1
        return seen


async def test_a_promoted_replica_serves_no_read_from_its_next_checkout(
    own_cluster: LocalCluster,
) -> None:
    seen = await reads_after_a_promotion(own_cluster)
    promoted = own_cluster.node("replica-1").port
    assert f"primary:{promoted}" not in seen, seen
    assert seen == Counter({f"replica:{own_cluster.node('replica-2').port}": 40, "ejected": 1})


async def test_counter_proof_without_the_parameter_status_reads_land_on_it(
    own_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without in_hot_standby at checkout, only the next probe (an hour away) would see it.
    monkeypatch.setattr(AsyncpgDriver, "in_hot_standby", lambda self, connection: None)
    seen = await reads_after_a_promotion(own_cluster)
    assert seen[f"primary:{own_cluster.node('replica-1').port}"] > 0, seen
