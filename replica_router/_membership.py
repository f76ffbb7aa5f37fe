"""Membership: the replica set changes while the router runs.

``set_replicas`` keeps the nodes whose URL stays (their state and pools too), builds
the new ones (probed before they serve: a node that was never probed is not fit until
its first probe answers), and drains the removed ones: no new session goes there, and
their pools close once the sessions in flight ended. A discovery source (Patroni's
REST API) calls it on every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import URL

from ._discovery import Member, fetch_patroni_members
from ._health import HealthChecker, update_eligibility
from ._nodes import Node, Role, Topology, build_node, dispose_node
from ._settings import RouterSettings
from ._urls import parse_url, split_replica_options

__all__ = ["Membership"]

logger = logging.getLogger("replica_router")


def _identity(url: URL) -> str:
    return url.render_as_string(hide_password=False)


class Membership:
    """Changes the topology's replicas; optionally follows Patroni.

    Args:
        topology: the nodes (its ``replicas`` is replaced).
        settings: the router's settings (``patroni_url``, intervals, timeouts).
        health: told of every change (probes start and stop).
        engine_options, session_options: what every new node gets.
    """

    __slots__ = (
        "_draining",
        "_engine_options",
        "_health",
        "_lock",
        "_session_options",
        "_settings",
        "_task",
        "_topology",
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

    async def set_replicas(self, replica_urls: Sequence[str | URL]) -> None:
        """Replace the replicas; see the module docstring."""
        async with self._lock:
            kept, new, removed = self._plan(replica_urls)
            # Probed before they serve: a node nobody asked yet is not known to be a replica.
            await asyncio.gather(*(self._health.probe(node) for node in new))
            self._topology.replicas = tuple(kept)
            for node in new:
                logger.info("replica %s added", node.name)
            for node in removed:
                logger.info("replica %s removed; its pool closes once its sessions end", node.name)
                task = asyncio.get_running_loop().create_task(self._drain(node))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            self._health.sync()
            update_eligibility(self._topology.replicas, self._settings)

    def _plan(self, replica_urls: Sequence[str | URL]) -> tuple[list[Node], list[Node], list[Node]]:
        """The replicas to have (kept or new), the new ones, and the removed ones."""
        current = {_identity(n.url): n for n in self._topology.replicas}
        used = {n.name for n in self._topology.nodes}
        kept: list[Node] = []
        new: list[Node] = []
        for index, raw in enumerate(replica_urls):
            what = f"replica_urls[{index}]"
            url, name, weight = split_replica_options(parse_url(raw, what=what), what=what)
            node = current.pop(_identity(url), None)
            if node is None:
                name = name or _free_name(used)
                used.add(name)
                node = build_node(
                    name,
                    Role.REPLICA,
                    url,
                    weight,
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

    # -- Patroni ------------------------------------------------------------------------

    async def start(self) -> None:
        """With ``patroni_url``: take the members now, then follow them on the interval."""
        if not self._settings.patroni_url:
            return
        await self._follow_once()
        self._task = asyncio.create_task(self._follow(), name="replica-router patroni")

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
            await self._follow_once()

    async def _follow_once(self) -> None:
        settings = self._settings
        try:
            members = await fetch_patroni_members(settings.patroni_url, settings.health_timeout)
        except OSError as exc:
            logger.warning("Patroni discovery: %s; the replicas stay as they were", exc)
            return
        urls = [self._member_url(m) for m in members if m.readable]
        await self.set_replicas(urls)

    def _member_url(self, member: Member) -> URL:
        """A member's URL: the primary's credentials and database, the member's address."""
        base = self._topology.primary.url.difference_update_query(
            ["host", "port", "target_session_attrs"]
        )
        return base.set(host=member.host, port=member.port).update_query_dict(
            {"replica_name": member.name}
        )


def _free_name(used: set[str]) -> str:
    index = 1
    while f"replica-{index}" in used:
        index += 1
    return f"replica-{index}"
