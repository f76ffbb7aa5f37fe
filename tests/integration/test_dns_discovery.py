"""DNS discovery against real servers: a name over several addresses is one node each.

Two streaming replicas listen on 127.0.0.2 and 127.0.0.3, on the same port
(``LocalCluster(replica_addresses=...)``), and a name of our own resolves to them through
``/etc/hosts`` lines the tests write and remove: the operating system's resolver answers,
as it would for a Kubernetes headless Service. Nothing of the router is stubbed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from replica_router import ReplicaRouter, RouterSettings
from replica_router._nodes import Node
from replica_router.cli import main
from replica_router.testing import LocalCluster

pytestmark = pytest.mark.integration

HOSTS = Path("/etc/hosts")
MARKER = "# replica-router test, pid "
ADDRESSES = ("127.0.0.2", "127.0.0.3")
INTERVAL = 0.3


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_hosts(keep: Callable[[str], bool], extra: list[str]) -> None:
    """Rewrite /etc/hosts: the lines ``keep`` accepts, then ``extra``. Replaced in one
    step where the file can be (never half written for another process' lookup)."""
    lines = [line for line in HOSTS.read_text().splitlines() if keep(line)] + extra
    content = "".join(f"{line}\n" for line in lines)
    temporary = HOSTS.with_name(f".hosts.replica-router.{os.getpid()}")
    try:
        temporary.write_text(content)
        temporary.chmod(HOSTS.stat().st_mode & 0o777)
        os.replace(temporary, HOSTS)
    except OSError:  # a bind-mounted /etc/hosts cannot be replaced: written in place
        temporary.unlink(missing_ok=True)
        HOSTS.write_text(content)


class HostsName:
    """A name of our own in /etc/hosts, each line tagged with the marker and our pid."""

    def __init__(self) -> None:
        self.name = f"rr-dns-{secrets.token_hex(4)}.test"
        self._tag = f"{MARKER}{os.getpid()} {self.name}"

    def set(self, *addresses: str) -> None:
        """The name resolves to these addresses from now on (none: it does not resolve)."""
        _write_hosts(
            lambda line: self._tag not in line,
            [f"{address} {self.name} {self._tag}" for address in addresses],
        )

    def url(self, cluster: LocalCluster) -> str:
        """A replica URL over the name, on the replicas' shared port."""
        return cluster.replica_urls[0].replace(f"@{ADDRESSES[0]}:", f"@{self.name}:")


def _not_stale(line: str) -> bool:
    """False for a line an earlier, interrupted run left behind (its process is gone)."""
    if MARKER not in line:
        return True
    pid = line.split(MARKER, 1)[1].split()[0]
    return pid.isdigit() and _pid_alive(int(pid))


@pytest.fixture
def hosts_name() -> Iterator[HostsName]:
    if not os.access(HOSTS, os.W_OK):
        pytest.skip("/etc/hosts is not writable: these tests need a DNS name they control")
    _write_hosts(_not_stale, [])
    entry = HostsName()
    try:
        yield entry
    finally:
        entry.set()


@pytest.fixture(scope="module")
def dns_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(replicas=2, replica_addresses=ADDRESSES) as cluster:
        cluster.execute("primary", "CREATE TABLE dns_t (id int)")
        cluster.wait_for_replay()
        yield cluster


def settings(**values: object) -> RouterSettings:
    base: dict[str, object] = {
        "health_interval": INTERVAL,
        "health_timeout": 1.0,
        "read_your_writes": "off",
        "dns_discovery": True,
        # A few KB of WAL not replayed is "lagging": a paused replica shows at once.
        "max_lag_bytes": 4096,
    }
    return RouterSettings.defaults(**{**base, **values})


def names(router: ReplicaRouter) -> list[str]:
    return [node.name for node in router.replicas]


async def wait_until(predicate: Callable[[], object], timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def servers(router: ReplicaRouter, reads: int = 30) -> Counter[str]:
    """Which server address each of ``reads`` reads ran on."""
    seen: Counter[str] = Counter()
    for _ in range(reads):
        async with router.reader_session() as db:
            seen[await server_of(db)] += 1
    return seen


async def server_of(db: AsyncSession) -> str:
    row = (await db.execute(text("SELECT host(inet_server_addr()), pg_is_in_recovery()"))).one()
    return str(row[0]) if row[1] else "primary"


def idle(node: Node) -> int:
    pool = node.engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedin()


# Within two intervals, and some slack for a loaded machine.
WITHIN = 2 * INTERVAL + 3


async def test_a_name_that_gains_an_address_gains_a_node(
    dns_cluster: LocalCluster, hosts_name: HostsName
) -> None:
    hosts_name.set(ADDRESSES[0])
    async with ReplicaRouter(
        dns_cluster.primary_url, [hosts_name.url(dns_cluster)], settings=settings()
    ) as router:
        two, three = (f"replica-1@{address}" for address in ADDRESSES)
        assert names(router) == [two]
        assert set(await servers(router)) == {ADDRESSES[0]}

        hosts_name.set(*ADDRESSES)
        took = await wait_until(lambda: names(router) == [two, three], WITHIN)
        assert took < WITHIN
        added = router.replicas[1]
        await wait_until(lambda: router.status().node(three).healthy, WITHIN)
        assert set(await servers(router)) == set(ADDRESSES)  # reads land on both servers
        assert added.url.host == ADDRESSES[1] and added.url.port == dns_cluster.replicas[1].port

        # The health routes show the expanded nodes.
        app = FastAPI()
        app.include_router(router.health_routes())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            nodes = (await client.get("/health/nodes")).json()["nodes"]
        assert [n["name"] for n in nodes] == ["primary", two, three]
        assert dns_cluster.password not in str(nodes)

        # Lag is measured per server: the paused one is out, the other serves.
        dns_cluster.pause_replay("replica-2")
        try:
            dns_cluster.execute("primary", "INSERT INTO dns_t SELECT generate_series(1, 2000)")
            await wait_until(lambda: router.status().node(three).reason == "lagging", WITHIN)
            assert router.status().node(two).healthy
            assert set(await servers(router)) == {ADDRESSES[0]}
        finally:
            dns_cluster.resume_replay("replica-2")
        await wait_until(lambda: router.status().node(three).healthy, WITHIN)

        # An address that goes away: its node is dropped, and its pool closes.
        first = router.replicas[0]
        assert idle(first) > 0
        hosts_name.set(ADDRESSES[1])
        await wait_until(lambda: names(router) == [three], WITHIN)
        assert router.replicas[0] is added  # the node that stays is the same one
        assert set(await servers(router)) == {ADDRESSES[1]}
        await wait_until(lambda: idle(first) == 0, 10)


async def test_counter_proof_without_dns_discovery_the_name_is_one_node(
    dns_cluster: LocalCluster, hosts_name: HostsName
) -> None:
    hosts_name.set(ADDRESSES[0])
    async with ReplicaRouter(
        dns_cluster.primary_url,
        [hosts_name.url(dns_cluster)],
        settings=settings(dns_discovery=False),
    ) as router:
        hosts_name.set(*ADDRESSES)
        await asyncio.sleep(3 * INTERVAL)
        assert names(router) == ["replica-1"]  # no node was gained
        assert router.replicas[0].url.host == hosts_name.name
        # One node for two servers: it stands or falls with the server its connections
        # reach first (127.0.0.2), while 127.0.0.3 is caught up and gets no read.
        dns_cluster.pause_replay("replica-1")
        try:
            dns_cluster.execute("primary", "INSERT INTO dns_t SELECT generate_series(1, 2000)")
            await wait_until(lambda: router.status().node("replica-1").reason == "lagging", WITHIN)
            assert set(await servers(router)) == {"primary"}
        finally:
            dns_cluster.resume_replay("replica-1")


async def test_a_name_that_does_not_resolve_keeps_its_nodes(
    dns_cluster: LocalCluster, hosts_name: HostsName, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "replica_router")
    async with ReplicaRouter(
        dns_cluster.primary_url, [hosts_name.url(dns_cluster)], settings=settings()
    ) as router:
        # Not resolvable at start: the URL as given, one node (down: no server by that name).
        assert names(router) == ["replica-1"]
        hosts_name.set(*ADDRESSES)
        expanded = [f"replica-1@{address}" for address in ADDRESSES]
        await wait_until(lambda: names(router) == expanded, WITHIN)
        kept = router.replicas
        hosts_name.set()  # a DNS blip: the name is gone for a while
        await asyncio.sleep(3 * INTERVAL)
        assert router.replicas == kept
        await wait_until(lambda: all(router.status().node(n).healthy for n in expanded), WITHIN)
        assert set(await servers(router)) == set(ADDRESSES)
    failures = [r for r in caplog.records if "did not resolve" in r.getMessage()]
    assert len(failures) == 2  # once at start, once for the blip: not every interval


def test_check_expands_the_name_as_the_router_does(
    dns_cluster: LocalCluster,
    hosts_name: HostsName,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hosts_name.set(*ADDRESSES)
    for name in list(os.environ):
        if name.startswith("REPLICA_ROUTER_") and name not in (
            "REPLICA_ROUTER_PG_BIN",
            "REPLICA_ROUTER_PG_USER",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REPLICA_ROUTER_PRIMARY_URL", dns_cluster.primary_url)
    monkeypatch.setenv("REPLICA_ROUTER_REPLICA_URLS", hosts_name.url(dns_cluster))
    monkeypatch.setenv("REPLICA_ROUTER_DNS_DISCOVERY", "true")
    with ThreadPoolExecutor(max_workers=1) as pool:  # asyncio.run, away from pytest's loop
        assert pool.submit(main, ["check"]).result(timeout=60) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[1:] if line.startswith("replica-")]
    assert rows == [f"replica-1@{address}" for address in ADDRESSES], out
    assert "ok: 3 nodes reachable" in out
