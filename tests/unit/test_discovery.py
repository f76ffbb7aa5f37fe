"""Discovery without servers: which hosts DNS discovery expands, how the nodes are named,
what a failed lookup keeps, and Patroni's lag figure. The resolver is a stub at the seam
(``resolve_addresses``); the nodes point at ports where nothing listens."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from replica_router import ConfigurationError, ReplicaRouter, RouterSettings
from replica_router import _membership as membership
from replica_router._discovery import _members, dns_name, pick_addresses
from replica_router._health import update_eligibility
from replica_router._status import node_status
from replica_router.metrics import mount_metrics

# Nothing listens on port 1: every probe fails at once (connection refused).
PRIMARY = "postgresql://app:pw@127.0.0.1:1/app"
SERVICE = "postgresql://app:pw@db-headless:1/app"


@pytest.mark.parametrize(
    ("url", "expanded"),
    [
        ("postgresql://u:p@db-headless.ns.svc:5432/app", "db-headless.ns.svc"),
        ("postgresql://u:p@localhost/app", "localhost"),
        ("postgresql://u:p@10.0.0.5:5432/app", None),
        ("postgresql://u:p@[fd00::5]:5432/app", None),
        ("postgresql://u:p@[fe80::1%25eth0]:5432/app", None),
        ("postgresql://u:p@/app?host=/var/run/postgresql", None),
        ("postgresql://u:p@/app?host=pg-1:5432&host=pg-2:5432", None),
        ("postgresql://u:p@pg-1/app?host=pg-2:5432", None),
    ],
)
def test_which_hosts_are_expanded(url: str, expanded: str | None) -> None:
    assert dns_name(make_url(url)) == expanded


def info(address: str) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family, socket.SOCK_STREAM, 6, "", (address, 5432))


def test_addresses_are_distinct_and_in_address_order() -> None:
    found = pick_addresses(info(a) for a in ["10.0.0.10", "10.0.0.9", "10.0.0.10", "10.0.0.2"])
    assert found == ["10.0.0.2", "10.0.0.9", "10.0.0.10"]


def test_a_dual_stack_name_is_its_ipv4_addresses_only() -> None:
    # One pod has an A and an AAAA record: one server, not two nodes.
    assert pick_addresses(info(a) for a in ["fd00::2", "10.0.0.2", "fd00::1"]) == ["10.0.0.2"]
    assert pick_addresses(info(a) for a in ["fd00::2", "fd00::1"]) == ["fd00::1", "fd00::2"]


def test_the_setting_is_off_by_default_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RouterSettings.defaults().dns_discovery is False
    assert RouterSettings.defaults(dns_discovery="true").dns_discovery is True
    monkeypatch.setenv("REPLICA_ROUTER_DNS_DISCOVERY", "maybe")
    with pytest.raises(ConfigurationError, match=r"REPLICA_ROUTER_DNS_DISCOVERY: .*true/false"):
        RouterSettings(_env_file=None)


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_optional_number_means_none(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv("REPLICA_ROUTER_READ_TIMEOUT", blank)
    monkeypatch.setenv("REPLICA_ROUTER_FALLBACK_MAX_IN_FLIGHT", blank)
    settings = RouterSettings(_env_file=None)
    assert (settings.read_timeout, settings.fallback_max_in_flight) == (None, None)
    assert RouterSettings.defaults(read_timeout=blank).read_timeout is None
    # Empty is "no bound", not "anything goes": a bad value is still refused.
    with pytest.raises(ConfigurationError, match="read_timeout: Input should be greater than 0"):
        RouterSettings.defaults(read_timeout="0")


class Resolver:
    """A stub for ``resolve_addresses``: names to addresses, and names that fail."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.names[host])


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    stub = Resolver()
    monkeypatch.setattr(membership, "resolve_addresses", stub)
    return stub


def dns_router(replicas: list[str], **settings: Any) -> ReplicaRouter:
    values: dict[str, Any] = {"dns_discovery": True, "health_timeout": 0.5, **settings}
    return ReplicaRouter(PRIMARY, replicas, settings=RouterSettings.defaults(**values))


def names(router: ReplicaRouter) -> list[str]:
    return [node.name for node in router.replicas]


async def test_each_address_becomes_a_node_named_after_the_url(resolver: Resolver) -> None:
    resolver.names["db-headless"] = ["127.0.0.5", "127.0.0.6"]
    router = dns_router([])
    try:
        await router.set_replicas(
            [
                SERVICE,  # unnamed: replica-<position>
                "postgresql://app:pw@db-headless:2/app?replica_name=eu&replica_weight=3",
                "postgresql://app:pw@127.0.0.9:1/app",  # an address stays as it is
            ]
        )
        assert names(router) == [
            "replica-1@127.0.0.5",
            "replica-1@127.0.0.6",
            "eu@127.0.0.5",
            "eu@127.0.0.6",
            "replica-3",  # by its position, as without DNS discovery
        ]
        first = router.replicas[0]
        assert (first.url.host, first.url.port, first.url.username) == ("127.0.0.5", 1, "app")
        assert first.url.password == "pw" and first.url.database == "app"
        assert [n.weight for n in router.replicas] == [1.0, 1.0, 3.0, 3.0, 1.0]
        assert [s.name for s in router.status().nodes[1:]] == names(router)
    finally:
        await router.close()


async def test_an_address_two_urls_give_is_one_node(resolver: Resolver) -> None:
    resolver.names["db-headless"] = ["127.0.0.5", "127.0.0.6"]
    router = dns_router([])
    try:
        await router.set_replicas(["postgresql://app:pw@127.0.0.5:1/app", SERVICE, SERVICE])
        assert [n.url.host for n in router.replicas] == ["127.0.0.5", "127.0.0.6"]
        assert names(router) == ["replica-1", "replica-2@127.0.0.6"]  # the first wins
    finally:
        await router.close()


async def test_off_nothing_is_resolved(resolver: Resolver) -> None:
    router = dns_router([SERVICE], dns_discovery=False)
    try:
        await router.set_replicas([SERVICE])
        assert names(router) == ["replica-1"] and resolver.calls == []
    finally:
        await router.close()


async def test_a_failed_lookup_keeps_the_nodes_and_warns_once(
    resolver: Resolver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "replica_router")
    router = dns_router([SERVICE])
    try:
        # Never resolved: the URL as given, under its own name.
        await router.set_replicas([SERVICE])
        assert names(router) == ["replica-1"]
        assert router.replicas[0].url.host == "db-headless"
        resolver.names["db-headless"] = ["127.0.0.5", "127.0.0.6"]
        await router.set_replicas([SERVICE])
        kept = router.replicas
        assert names(router) == ["replica-1@127.0.0.5", "replica-1@127.0.0.6"]
        del resolver.names["db-headless"]  # a DNS blip
        await router.set_replicas([SERVICE])
        await router.set_replicas([SERVICE])
        assert router.replicas == kept  # the same nodes, state and pools
        warnings = [r for r in caplog.records if "did not resolve" in r.getMessage()]
        assert len(warnings) == 2  # once before the first success, once after it
        assert all("pw" not in r.getMessage() for r in caplog.records)
        resolver.names["db-headless"] = ["127.0.0.6"]
        await router.set_replicas([SERVICE])
        assert router.replicas == kept[1:]
        assert any("resolves again" in r.getMessage() for r in caplog.records)
    finally:
        await router.close()


async def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 (polls state that has no event)
            await asyncio.sleep(0.02)


async def test_started_the_name_is_resolved_again_every_interval(resolver: Resolver) -> None:
    resolver.names["db-headless"] = ["127.0.0.5"]
    async with dns_router([SERVICE], health_interval=0.1) as router:
        assert names(router) == ["replica-1@127.0.0.5"]  # before the first request
        resolver.names["db-headless"] = ["127.0.0.5", "127.0.0.6"]
        await wait_for(lambda: names(router) == ["replica-1@127.0.0.5", "replica-1@127.0.0.6"])
        resolver.names["db-headless"] = ["127.0.0.6"]
        await wait_for(lambda: names(router) == ["replica-1@127.0.0.6"])


def test_a_member_lag_patroni_cannot_tell_is_none() -> None:
    document = {
        "members": [
            {"name": "pg-1", "role": "leader", "host": "10.0.0.1", "port": 5432},
            {"name": "pg-2", "role": "replica", "state": "streaming", "host": "10.0.0.2",
             "port": 5432, "lag": 2048},
            {"name": "pg-3", "role": "replica", "state": "streaming", "host": "10.0.0.3",
             "port": 5432, "lag": "unknown"},
        ]
    }  # fmt: skip
    assert [m.lag_bytes for m in _members(document)] == [None, 2048, None]


def test_patroni_lag_beyond_the_bound_makes_a_replica_unfit() -> None:
    router = ReplicaRouter(
        PRIMARY,
        [f"{PRIMARY}?replica_name=a", f"{PRIMARY}?replica_name=b"],
        settings=RouterSettings.defaults(max_lag_bytes=1000),
    )
    a, b = router.replicas
    for node in (a, b):
        node.state.in_recovery, node.state.lag_bytes, node.state.lag_seconds = True, 0, 0.0
    a.state.patroni_lag_bytes, b.state.patroni_lag_bytes = 5000, 1000  # b: at the bound
    update_eligibility(router.replicas, router.settings)
    assert (a.state.lagging, b.state.lagging) == (True, False)
    shown = node_status(a)
    assert (shown.healthy, shown.reason, shown.patroni_lag_bytes) == (False, "lagging", 5000)
    assert router._reads.fit_replicas() == [b]
    a.state.patroni_lag_bytes = 10  # Patroni reports it caught up
    update_eligibility(router.replicas, router.settings)
    assert router._reads.fit_replicas() == [a, b]


@asynccontextmanager
async def fake_patroni(document: dict[str, Any]) -> AsyncIterator[str]:
    """A REST API that answers ``GET /cluster`` with ``document`` (as it is at the time)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = json.dumps(document).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        writer.write(head + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def patroni_lag_metrics(router: ReplicaRouter) -> dict[str, float]:
    """``replica_router_replica_patroni_lag_bytes`` by node, as Prometheus scrapes it."""
    from prometheus_client.parser import text_string_to_metric_families

    app = FastAPI()
    mount_metrics(app, router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        text = (await http.get("/metrics/")).text
    return {
        sample.labels["node"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "replica_router_replica_patroni_lag_bytes"
        for sample in family.samples
    }


async def test_patroni_lag_is_followed_and_shown(caplog: pytest.LogCaptureFixture) -> None:
    def member(name: str, lag: object) -> dict[str, object]:
        return {"name": name, "role": "replica", "state": "streaming", "host": "127.0.0.1",
                "port": int(name[-1]), "lag": lag}  # fmt: skip

    document: dict[str, Any] = {"members": [member("pg-2", 9_000_000), member("pg-3", 0)]}
    caplog.set_level(logging.WARNING, "replica_router")
    async with fake_patroni(document) as api:
        settings = RouterSettings.defaults(
            patroni_url=api, health_interval=0.1, health_timeout=0.5, max_lag_bytes=1_000_000
        )
        async with ReplicaRouter(PRIMARY, settings=settings) as router:
            status = router.status()
            assert [n.patroni_lag_bytes for n in status.nodes] == [None, 9_000_000, 0]
            two, three = router.replicas
            assert (two.state.lagging, three.state.lagging) == (True, False)
            assert any("Patroni reports 9000000 bytes" in r.getMessage() for r in caplog.records)
            assert await patroni_lag_metrics(router) == {"pg-2": 9_000_000, "pg-3": 0}
            document["members"] = [member("pg-2", 200), member("pg-3", "unknown")]
            await wait_for(lambda: not two.state.lagging)
            assert router.status().to_dict()["nodes"][2]["patroni_lag_bytes"] is None
            assert router.replicas == (two, three)  # the same nodes, followed


def test_the_readme_headless_service_is_valid_and_headless() -> None:
    import kubernetes_validate
    import kubernetes_validate.utils
    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    _, found, rest = readme.partition("<!-- snippet: headless -->\n```yaml\n")
    assert found
    block, _, after = rest.partition("\n```\n")
    shown = yaml.safe_load(block)
    kubernetes_validate.validate(shown, kubernetes_validate.utils.latest_version(), strict=True)
    assert shown["spec"]["clusterIP"] == "None"
    lines = after.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    env = dict(line.split("=", 1) for line in lines)
    name = shown["metadata"]["name"]
    settings = RouterSettings.defaults(
        dns_discovery=env["REPLICA_ROUTER_DNS_DISCOVERY"],
        replica_urls=env["REPLICA_ROUTER_REPLICA_URLS"],
    )
    assert settings.dns_discovery and dns_name(settings.replica_urls[0]) == name


@pytest.mark.parametrize(
    ("addresses", "problem"),
    [
        (["127.0.0.2"], "one address per replica"),
        ("127.0.0.2,127.0.0.3", "one address per replica"),
        (["127.0.0.2", "10.0.0.3"], "not an IPv4 loopback address"),
        (["127.0.0.2", "localhost"], "not an IPv4 loopback address"),
        (["127.0.0.2", "127.0.0.2"], "distinct"),
    ],
)
def test_the_test_cluster_checks_its_replica_addresses(addresses: Any, problem: str) -> None:
    from replica_router.testing import LocalCluster

    with pytest.raises(ValueError, match=problem):
        LocalCluster(replicas=2, replica_addresses=addresses)
    assert LocalCluster(replicas=2, replica_addresses=("127.0.0.2", "127.0.0.3"))
