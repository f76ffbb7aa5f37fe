"""Discovery: where the members are, from Patroni's REST API or from DNS.

A source answers one question, "which servers are there now?", as host:port pairs
with a role; the router turns them into nodes (``set_replicas``). Two sources:

* Patroni: ``GET /cluster`` on any of the configured REST API addresses (the first
  that answers) lists every member with its role (``leader``, ``replica``,
  ``sync_standby``, ...), state (``streaming``, ``running``) and lag in bytes.
* DNS: a replica host that resolves to several addresses (a Kubernetes headless
  service) stands for one server per address, so each is probed and measured on its
  own, not whichever one a connection happened to land on. :func:`dns_name` says
  which URLs are expanded, :func:`resolve_addresses` finds the addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

__all__ = [
    "Member",
    "dns_name",
    "fetch_patroni_members",
    "member_url",
    "pick_addresses",
    "resolve_addresses",
]

logger = logging.getLogger("replica_router.discovery")

# Patroni roles that stream from the leader and may serve reads.
_REPLICA_ROLES = frozenset({"replica", "sync_standby", "quorum_standby"})
_MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class Member:
    """One server a source reported.

    Attributes:
        name: the member's name (Patroni's), or ``host:port``.
        host, port: where PostgreSQL listens.
        leader: it takes the writes.
        streaming: a replica that streams from the leader now (Patroni's ``state``).
        lag_bytes: the source's own view of its lag, if it has one.
    """

    name: str
    host: str
    port: int
    leader: bool = False
    streaming: bool = True
    lag_bytes: int | None = None

    @property
    def readable(self) -> bool:
        """A streaming replica: fit to be a node that serves reads."""
        return not self.leader and self.streaming


async def _get_json(url: str, seconds: float) -> object:
    """``GET url`` over plain HTTP/1.1 (Patroni's REST API), its body decoded as JSON."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("expected an http://host:port address")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path.rstrip("/") or "") + "/cluster"
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("latin-1"))
            raw = await reader.read(_MAX_BODY)
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ValueError(f"answered {status[1:2]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return json.loads(body)


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def _members(document: object) -> list[Member]:
    if not isinstance(document, dict) or not isinstance(document.get("members"), list):
        raise ValueError("no members list")
    found: list[Member] = []
    for item in document["members"]:
        if not isinstance(item, dict):
            continue
        host, port, role = item.get("host"), item.get("port"), item.get("role")
        if not isinstance(host, str) or not isinstance(port, int):
            continue
        leader = role in ("leader", "master", "standby_leader")
        if not leader and role not in _REPLICA_ROLES:
            continue
        lag = item.get("lag")
        found.append(
            Member(
                name=str(item.get("name") or f"{host}:{port}"),
                host=host,
                port=port,
                leader=leader,
                # "running" too: Patroni's state lags the server's; the probes decide
                # whether it is caught up. Starting, stopped or crashed ones are left out.
                streaming=leader or item.get("state") in ("streaming", "running"),
                lag_bytes=lag if isinstance(lag, int) else None,
            )
        )
    return found


def member_url(primary: URL, member: Member) -> URL:
    """A member's URL: the primary's driver, credentials and database, the member's
    address (without the primary's multi-host or ``target_session_attrs`` options)."""
    base = primary.difference_update_query(["host", "port", "target_session_attrs"])
    return base.set(host=member.host, port=member.port)


async def fetch_patroni_members(addresses: Sequence[str], seconds: float) -> list[Member]:
    """The members of a Patroni cluster, from the first REST API address that answers.

    Raises:
        OSError: none of the addresses answered with a member list.
    """
    errors: list[str] = []
    for address in addresses:
        try:
            return _members(await _get_json(address, seconds))
        except (OSError, TimeoutError, ValueError) as exc:
            errors.append(f"{address}: {type(exc).__name__}")
    raise OSError("no Patroni REST API answered (" + "; ".join(errors) + ")")


def dns_name(url: URL) -> str | None:
    """The host of ``url`` if it is a DNS name to expand into addresses, else None.

    Not expanded: an IP address, a Unix socket directory, and the multi-host form
    (``?host=h1:5432&host=h2:5432``), whose hosts are the driver's to try in order.
    """
    host = url.host
    if not host or "host" in url.query or host.startswith("/"):
        return None
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0: an address too
    except ValueError:
        return host
    return None


def pick_addresses(infos: Iterable[tuple[Any, ...]]) -> list[str]:
    """The distinct addresses of ``getaddrinfo`` results, in address order.

    IPv4 only when there are both: a dual-stack Kubernetes Service has an A and an AAAA
    record for each pod, and one pod is one server, not two nodes.
    """
    found: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for info in infos:
        text = str(info[4][0])
        try:
            found[text] = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
    if any(a.version == 4 for a in found.values()) and any(a.version == 6 for a in found.values()):
        found = {text: a for text, a in found.items() if a.version == 4}
    return sorted(found, key=lambda text: (found[text].version, found[text], text))


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to now (one per server behind a headless
    service), as :func:`pick_addresses` orders them.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``), or to nothing.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = pick_addresses(infos)
    if not addresses:
        raise OSError(f"{host} resolved to no address")
    return addresses
