"""Discovery: where the members are, from Patroni's REST API or from DNS.

A source answers one question, "which servers are there now?", as host:port pairs
with a role; the router turns them into nodes (``set_replicas``). Two sources:

* Patroni: ``GET /cluster`` on any of the configured REST API addresses (the first
  that answers) lists every member with its role (``leader``, ``replica``,
  ``sync_standby``, ...), state (``streaming``, ``running``) and lag in bytes.
* DNS: a replica host that resolves to several addresses (a Kubernetes headless
  service) stands for one server per address, so each is probed and measured on its
  own, not whichever one a connection happened to land on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Member", "fetch_patroni_members", "resolve_addresses"]

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


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to now (one per server behind a headless
    service), sorted; an address stays an address."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})
