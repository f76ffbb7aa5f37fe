"""Membership: the replica set changes while the router runs.

``set_replicas`` keeps the nodes whose URL stays (their state and pools too), builds
the new ones (probed before they serve: a node that was never probed is not fit until
its first probe answers), and drains the removed ones: no new session goes there, and
their pools close once the sessions in flight ended.

Discovery, when configured, does the same at start and on every interval: the URLs
wanted are the members Patroni's REST API reports as streaming (``patroni_url``, with
the lag Patroni reports for each), or else the configured ones; with ``dns_discovery``
each URL whose host is a DNS name becomes one URL per address the name resolves to,
named ``<name>@<address>`` (``replica-1@10.0.0.5``), so each server is probed and
measured on its own. A lookup that fails keeps that URL's last addresses (a DNS blip
drops no replica); a URL that never resolved stays as given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.engine import URL

from ._discovery import Member, dns_name, fetch_patroni_members, member_url, resolve_addresses
from ._health import HealthChecker, update_eligibility
from ._nodes import Node, Role, Topology, build_node, dispose_node
from ._settings import RouterSettings
from ._urls import parse_url, split_replica_options

__all__ = ["Membership"]

logger = logging.getLogger("replica_router")


def _identity(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@dataclass(frozen=True, slots=True)
class _Wanted:
    """A replica to have: its URL (replica options taken out), name (None: a default
    one), weight, and the lag in bytes Patroni reports for it."""

    url: URL
    name: str | None = None
    weight: float = 1.0
    patroni_lag: int | None = None


class Membership:
    """Changes the topology's replicas; follows Patroni and DNS when configured.

    Args:
        topology: the nodes (its ``replicas`` is replaced).
        settings: the router's settings (``patroni_url``, ``dns_discovery``, intervals,
            timeouts).
        health: told of every change (probes start and stop).
        engine_options, session_options: what every new node gets.
    """

    __slots__ = (
        "_addresses",
        "_configured",
        "_draining",
        "_engine_options",
        "_health",
        "_lock",
        "_session_options",
        "_settings",
        "_task",
        "_topology",
        "_unresolved",
    )

    def __init__(
        self,
        topology: Topology,
        settings: RouterSettings,
        health: HealthChecker,
        engine_options: Mapping[str, Any],
        session_options: Mapping[str, Any],
    ) -> None:
        self._topology = topology
        self._settings = settings
        self._health = health
        self._engine_options = dict(engine_options)
        self._session_options = dict(session_options)
        self._draining: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # The replicas as configured, before DNS expansion (replaced by set_replicas).
        self._configured = [_Wanted(n.url, n.name, n.weight) for n in topology.replicas]
        # Per URL with a DNS name: the addresses of its last lookup that succeeded, and
        # whether its last lookup failed (warned once per failure, not per interval).
        self._addresses: dict[str, list[str]] = {}
        self._unresolved: set[str] = set()

    async def set_replicas(self, replica_urls: Sequence[str | URL]) -> None:
        """Replace the replicas; see the module docstring."""
        wanted: list[_Wanted] = []
        for index, raw in enumerate(replica_urls):
            what = f"replica_urls[{index}]"
            url, name, weight = split_replica_options(parse_url(raw, what=what), what=what)
            wanted.append(_Wanted(url, name, weight))
        async with self._lock:
            self._configured = wanted
            await self._apply(await self._expand(wanted), probe=True)

    async def _apply(self, wanted: Sequence[_Wanted], *, probe: bool) -> None:
        """Make the replicas these (the lock is held). ``probe``: probe new nodes first
        (False before the health checker's start, which probes every node)."""
        kept, new, removed = self._plan(wanted)
        if probe:
            # Probed before they serve: a node nobody asked yet is not known to be a replica.
            await asyncio.gather(*(self._health.probe(node) for node in new))
        self._topology.replicas = tuple(kept)
        for node, want in zip(kept, wanted, strict=True):
            node.state.patroni_lag_bytes = want.patroni_lag
        for node in new:
            logger.info("replica %s added", node.name)
        for node in removed:
            logger.info("replica %s removed; its pool closes once its sessions end", node.name)
            task = asyncio.get_running_loop().create_task(self._drain(node))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        self._health.sync()
        update_eligibility(self._topology.replicas, self._settings)

    def _plan(self, wanted: Sequence[_Wanted]) -> tuple[list[Node], list[Node], list[Node]]:
        """The replicas to have (kept or new, in order), the new ones, the removed ones."""
        current = {_identity(n.url): n for n in self._topology.replicas}
        matched = [current.pop(_identity(want.url), None) for want in wanted]
        # Names in use once this plan is done; a draining node's default name is not
        # handed out again either.
        taken = {self._topology.primary.name} | {n.name for n in matched if n is not None}
        used = taken | {n.name for n in self._topology.replicas}
        kept: list[Node] = []
        new: list[Node] = []
        for want, node in zip(wanted, matched, strict=True):
            if node is None:
                name = want.name
                if name is None or name in taken:
                    fresh = _free_name(used)
                    if name is not None:
                        logger.warning("replica name %s is taken; the new one is %s", name, fresh)
                    name = fresh
                taken.add(name)
                used.add(name)
                node = build_node(
                    name,
                    Role.REPLICA,
                    want.url,
                    want.weight,
                    self._settings,
                    self._engine_options,
                    self._session_options,
                )
                new.append(node)
            kept.append(node)
        return kept, new, list(current.values())

    async def _drain(self, node: Node) -> None:
        """Wait for the sessions in flight on a removed node (bounded), then close it."""
        deadline = time.monotonic() + self._settings.pool_timeout + self._settings.dispose_timeout
        # in_flight is a plain counter, decremented wherever a session ends: poll it.
        while node.state.in_flight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await dispose_node(node, self._settings.dispose_timeout)

    # -- discovery: Patroni, DNS -----------------------------------------------------------

    async def start(self) -> None:
        """With discovery configured: take the replicas it finds now, before the first
        probes (the health checker's start probes every node), then follow it."""
        settings = self._settings
        if not (settings.patroni_url or settings.dns_discovery):
            return
        await self._discover(probe=False)
        self._task = asyncio.create_task(self._follow(), name="replica-router discovery")

    async def stop(self) -> None:
        """Stop following, and close the pools of every removed node."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._settings.health_interval)
            try:
                await self._discover(probe=True)
            except Exception:
                # The loop must outlive one bad round (a member URL the checks refuse).
                logger.warning("discovery failed; the replicas stay as they were", exc_info=True)

    async def _discover(self, *, probe: bool) -> None:
        """One round: the URLs wanted (Patroni's members, or the configured ones),
        expanded by DNS if configured, become the replicas."""
        settings = self._settings
        async with self._lock:
            wanted = self._configured
            if settings.patroni_url:
                try:
                    members = await fetch_patroni_members(
                        settings.patroni_url, settings.health_timeout
                    )
                except OSError as exc:
                    logger.warning("Patroni discovery: %s; the replicas stay as they were", exc)
                    return
                wanted = [self._member_wanted(m) for m in members if m.readable]
            await self._apply(await self._expand(wanted), probe=probe)

    def _member_wanted(self, member: Member) -> _Wanted:
        """A member's URL: the primary's credentials and database, the member's address."""
        url = member_url(self._topology.primary.url, member)
        return _Wanted(
            parse_url(url, what=f"Patroni member {member.name}"), member.name, 1.0, member.lag_bytes
        )

    async def _expand(self, wanted: Sequence[_Wanted]) -> list[_Wanted]:
        """With ``dns_discovery``: every URL whose host is a DNS name becomes one per
        address, named ``<name>@<address>`` (``<name>``: its own, or ``replica-<n>`` by
        position); an address another URL already gave is not listed twice."""
        if not self._settings.dns_discovery:
            return list(wanted)
        hosts = [dns_name(want.url) for want in wanted]
        found = iter(
            await asyncio.gather(
                *(
                    self._lookup(want.url, host)
                    for want, host in zip(wanted, hosts, strict=True)
                    if host is not None
                )
            )
        )
        out: list[_Wanted] = []
        seen: set[str] = set()
        for index, (want, host) in enumerate(zip(wanted, hosts, strict=True)):
            name = want.name or f"replica-{index + 1}"
            if host is None:
                out.append(replace(want, name=name))
                seen.add(_identity(want.url))
                continue
            addresses = next(found)
            if addresses is None:  # it never resolved: the URL as given
                out.append(replace(want, name=name))
                seen.add(_identity(want.url))
                continue
            for address in addresses:
                item = replace(want, url=want.url.set(host=address), name=f"{name}@{address}")
                key = _identity(item.url)
                if key not in seen:
                    seen.add(key)
                    out.append(item)
        # Forget what is known of URLs no longer wanted.
        keys = {_identity(w.url) for w, host in zip(wanted, hosts, strict=True) if host}
        self._addresses = {k: v for k, v in self._addresses.items() if k in keys}
        self._unresolved &= keys
        return out

    async def _lookup(self, url: URL, host: str) -> list[str] | None:
        """The addresses ``host`` resolves to now; after a failed lookup, those of the
        last one that succeeded (None if none ever did)."""
        key = _identity(url)
        try:
            async with asyncio.timeout(self._settings.health_timeout):
                addresses = await resolve_addresses(host, url.port or 5432)
        except OSError as exc:  # socket.gaierror, and TimeoutError
            if key not in self._unresolved:
                self._unresolved.add(key)
                logger.warning(
                    "DNS discovery: %s did not resolve (%s); its replicas stay as they were",
                    host,
                    str(exc) or type(exc).__name__,
                )
            return self._addresses.get(key)
        if key in self._unresolved:
            self._unresolved.discard(key)
            logger.info("DNS discovery: %s resolves again", host)
        self._addresses[key] = addresses
        return addresses


def _free_name(used: set[str]) -> str:
    index = 1
    while f"replica-{index}" in used:
        index += 1
    return f"replica-{index}"
