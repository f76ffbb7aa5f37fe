"""A user's set-up mistakes, without a server: refused connections, the status that tells
the truth, and the health routes' answers (the same on real servers: test_mistakes.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError, OperationalError

from replica_router import ErrorKind, ReplicaRouter, RouterSettings, RouterStatus
from replica_router._checkout import CheckoutFailed
from replica_router._nodes import CHECKOUT_BUCKETS
from replica_router._retry import classify, refusal
from replica_router.fastapi import health_routes

URL = "postgresql://app:pw@127.0.0.1:1/app"


def asyncpg_error(error: Exception) -> DBAPIError:
    return DBAPIError("connect", {}, error)


@pytest.mark.parametrize(
    ("error", "reason", "log"),
    [
        (
            asyncpg_error(
                asyncpg.exceptions.InvalidPasswordError(
                    'password authentication failed for user "app"'
                )
            ),
            "password authentication failed (28P01)",
            'password authentication failed for user "app" (28P01)',
        ),
        (
            asyncpg_error(
                asyncpg.exceptions.InvalidCatalogNameError('database "x" does not exist')
            ),
            "the database does not exist (3D000)",
            'database "x" does not exist (3D000)',
        ),
        (
            OperationalError(
                "connect",
                {},
                psycopg.OperationalError(
                    'connection failed: connection to server at "127.0.0.1", port 5432 '
                    'failed: FATAL:  role "nologin" is not permitted to log in'
                ),
            ),
            "the role may not connect (NOLOGIN, or no pg_hba.conf entry) (28000)",
            'role "nologin" is not permitted to log in (28000)',
        ),
        (
            psycopg.OperationalError(
                'connection failed: FATAL:  no pg_hba.conf entry for host "10.0.0.1", '
                'user "app", database "app", no encryption'
            ),
            "the role may not connect (NOLOGIN, or no pg_hba.conf entry) (28000)",
            'no pg_hba.conf entry for host "10.0.0.1", user "app", database "app", '
            "no encryption (28000)",
        ),
    ],
)
def test_a_refused_connection_is_an_authentication_error(
    error: Exception, reason: str, log: str
) -> None:
    assert classify(error, during_checkout=True) is ErrorKind.AUTHENTICATION
    assert refusal(error) == (reason, log)


def test_a_lost_psycopg_connection_is_not_a_refusal() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert refusal(lost) is None
    assert classify(lost, during_checkout=True) is ErrorKind.CONNECTION


def test_a_refused_primary_is_not_retried_but_a_refused_replica_is() -> None:
    router = ReplicaRouter(URL, [URL.replace(":1/", ":2/")])
    error = asyncpg_error(asyncpg.exceptions.InvalidPasswordError("password authentication failed"))
    primary = CheckoutFailed(router.primary, error)
    assert primary.final
    assert primary.summary == (
        "refused the connection: password authentication failed (28P01); check the user, "
        "password and database in its URL"
    )
    assert not CheckoutFailed(router.replicas[0], error).final
    lost = CheckoutFailed(router.primary, ConnectionRefusedError(111, "refused"))
    assert not lost.final
    assert lost.summary == "is unreachable (ConnectionRefusedError)"


# -- the status tells the truth ----------------------------------------------------------


def test_the_status_of_a_router_never_started() -> None:
    router = ReplicaRouter(URL, [URL.replace(":1/", ":2/")])
    status = router.status()
    assert status.started is False
    assert status.read_your_writes == "lsn"
    assert status.read_your_writes_active is False
    assert any("lifespan=router.lifespan" in w for w in status.warnings)


def test_the_default_read_policy_shows_the_bounds_in_force() -> None:
    settings = RouterSettings.defaults(max_lag_seconds=2.5, max_lag_bytes=1024)
    router = ReplicaRouter(URL, settings=settings)
    router.reader_with(max_lag_seconds=30)
    default, relaxed = router.status().to_dict()["reads"]
    assert (default["max_lag_seconds"], default["max_lag_bytes"]) == (2.5, 1024)
    assert (relaxed["max_lag_seconds"], relaxed["max_lag_bytes"]) == (30, None)


def test_the_checkout_histogram_is_labelled() -> None:
    router = ReplicaRouter(URL)
    for seconds in (0.0004, 0.003, 9.0):
        router.primary.state.observe_checkout(seconds)
    histogram = router.status().to_dict()["nodes"][0]["checkout_histogram"]
    assert list(histogram) == [*map(str, CHECKOUT_BUCKETS), "+Inf"]
    assert (histogram["0.0005"], histogram["0.005"], histogram["+Inf"]) == (1, 1, 1)
    assert sum(histogram.values()) == 3


# -- the health routes -----------------------------------------------------------------


class Source:
    def __init__(self, status: RouterStatus) -> None:
        self.value = status

    def status(self) -> RouterStatus:
        return self.value


def base_status(replicas: int = 2) -> RouterStatus:
    urls = [URL.replace(":1/", f":{n + 2}/") for n in range(replicas)]
    status = ReplicaRouter(URL, urls).status()
    return replace(status, started=True, health_checks_running=True, warnings=())


def with_nodes(status: RouterStatus, **health: bool) -> RouterStatus:
    nodes = tuple(
        replace(n, healthy=health.get(n.name.replace("-", "_"), n.healthy)) for n in status.nodes
    )
    return replace(status, nodes=nodes)


async def get(status: RouterStatus, path: str) -> tuple[int, Any]:
    app = FastAPI()
    app.include_router(health_routes(Source(status)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.get(path)
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("health", "fallback", "code", "reads", "writes", "reads_from"),
    [
        ({}, True, 200, True, True, ["replica-1", "replica-2"]),
        ({"primary": False}, True, 200, True, False, ["replica-1", "replica-2"]),
        ({"replica_1": False, "replica_2": False}, True, 200, True, True, ["primary"]),
        ({"replica_1": False, "replica_2": False}, False, 200, False, True, []),
        ({"primary": False, "replica_1": False, "replica_2": False}, True, 503, False, False, []),
    ],
)
async def test_ready_is_503_only_when_nothing_can_be_served(
    health: dict[str, bool],
    fallback: bool,
    code: int,
    reads: bool,
    writes: bool,
    reads_from: list[str],
) -> None:
    status = replace(with_nodes(base_status(), **health), fallback_to_primary=fallback)
    got, body = await get(status, "/health/ready")
    assert got == code
    assert (body["reads"], body["writes"], body["reads_from"]) == (reads, writes, reads_from)
    assert body["status"] == {(True, True): "ready", (False, False): "unavailable"}.get(
        (reads, writes), "degraded"
    )
    # Liveness never depends on a database.
    assert (await get(status, "/health/live"))[0] == 200


async def test_live_is_503_only_when_a_started_router_stopped_probing() -> None:
    status = base_status()
    assert await get(replace(status, health_checks_running=False), "/health/live") == (
        503,
        {"status": "stalled", "started": True, "health_checks_running": False},
    )
    never = replace(status, started=False, health_checks_running=False)
    assert (await get(never, "/health/live"))[0] == 200
