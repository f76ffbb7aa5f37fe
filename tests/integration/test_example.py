"""The example app, in both versions (tutorial get_db and replica-router), on the cluster."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from replica_router import ReplicaRouter, RouterSettings
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

os.environ.setdefault("REPLICA_ROUTER_PRIMARY_URL", "postgresql://unused@127.0.0.1:1/unused")
os.environ.setdefault("DATABASE_URL", "postgresql+asyncpg://unused@127.0.0.1:1/unused")

from examples.notes import app as routed  # noqa: E402
from examples.notes import app_get_db as tutorial  # noqa: E402


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http


async def crud(http: httpx.AsyncClient, cluster: LocalCluster) -> None:
    created = await http.post("/notes", json={"title": "hello", "body": "world"})
    assert created.status_code == 201, created.text
    note = created.json()
    cluster.wait_for_replay()
    assert (await http.get(f"/notes/{note['id']}")).json()["title"] == "hello"
    updated = await http.put(f"/notes/{note['id']}", json={"title": "bye", "body": "now"})
    assert updated.json()["title"] == "bye"
    cluster.wait_for_replay()
    assert any(n["id"] == note["id"] for n in (await http.get("/notes")).json())
    assert (await http.delete(f"/notes/{note['id']}")).status_code == 204
    cluster.wait_for_replay()
    assert (await http.get(f"/notes/{note['id']}")).status_code == 404


async def test_the_tutorial_version(replica_cluster: LocalCluster) -> None:
    app = tutorial.create_app(replica_cluster.primary_url)
    async with serve(app) as http:
        await crud(http, replica_cluster)
        assert (await http.get("/whoami")).json()["in_recovery"] is False


async def test_the_replica_router_version(replica_cluster: LocalCluster) -> None:
    router = ReplicaRouter(
        replica_cluster.primary_url,
        replica_cluster.replica_urls,
        settings=RouterSettings.defaults(health_interval=0.2),
    )
    app = routed.create_app(router)
    async with serve(app) as http:
        await crud(http, replica_cluster)
        where = [(await http.get("/whoami")).json() for _ in range(4)]
        assert all(w["in_recovery"] for w in where)
        assert len({w["server_port"] for w in where}) == 2
        assert (await http.get("/health/live")).status_code == 200

        # Read-your-writes (on by default): with replay paused, the client that wrote
        # still reads its note; a client without its cookie reads a stale replica.
        for node in replica_cluster.replicas:
            replica_cluster.pause_replay(node)
        try:
            created = await http.post("/notes", json={"title": "mine", "body": "now"})
            assert "rr_lsn" in http.cookies
            note = created.json()["id"]
            assert (await http.get(f"/notes/{note}")).status_code == 200
            http.cookies.clear()
            assert (await http.get(f"/notes/{note}")).status_code == 404
        finally:
            for node in replica_cluster.replicas:
                replica_cluster.resume_replay(node)

        metrics = (await http.get("/metrics/")).text
        assert "replica_router_node_healthy" in metrics
        assert 'replica_router_checkout_seconds_bucket{le="+Inf",node="replica-1"' in metrics
        assert (
            'replica_router_read_decisions_total{decision="primary_behind",policy="default"} 1.0'
            in metrics
        )
