"""The router's lifecycle: whether it started, and what it says about its own set-up.

A router that was never started still serves sessions, blind: nothing probes the
nodes (a down or lagging replica keeps getting reads) and no read-your-writes position
reaches a client. Its first session logs one warning that names
``lifespan=router.lifespan``, and ``router.status()`` says so too. At start-up a router
without replicas says so once; with ``REQUIRE_AT_START`` it refuses to start when a
node it needs cannot be reached or refuses the credentials, naming each node and why.

Example::

    lifecycle = Lifecycle(replicas_unset="REPLICA_ROUTER_REPLICA_URLS")
    await lifecycle.start(topology, settings)   # logs, and may raise
    lifecycle.session_opened()                  # warns once while not started
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import URL

from ._checkout import query_value
from ._exceptions import (
    ConfigurationError,
    NoHealthyReplicaError,
    PrimaryUnavailableError,
    ReplicaRouterError,
)
from ._health import describe
from ._nodes import Node, Topology
from ._retry import refusal
from ._settings import ENV_PREFIX, RouterSettings

__all__ = ["NOT_STARTED", "Lifecycle", "primary_url_of", "require_nodes"]

logger = logging.getLogger("replica_router")

NOT_STARTED = (
    "the router was never started (or is closed), so nothing probes the nodes (a down or "
    "lagging replica still gets reads) and read-your-writes positions never reach clients; pass "
    "lifespan=router.lifespan to FastAPI(...) (or run `async with router:` or "
    "`await router.start()` yourself)"
)
_NO_MIDDLEWARE = (
    "read-your-writes positions never reach clients: ReadYourWritesMiddleware is not in "
    "place (FastAPI(lifespan=router.lifespan) installs it)"
)


def primary_url_of(settings: RouterSettings, prefix: str) -> URL:
    """The primary's URL of settings read from the environment.

    Raises:
        ConfigurationError: ``{prefix}PRIMARY_URL`` is not set.
    """
    if settings.primary_url is None:
        raise ConfigurationError(
            f"{prefix}PRIMARY_URL is not set; expected the primary's URL, "
            "like postgresql+asyncpg://user:password@host:5432/database"
        )
    return settings.primary_url


class Lifecycle:
    """Started or not, the middleware in place or not, and what was said once.

    Args:
        replicas_unset: the variable that would have named the replicas, when the
            settings came from the environment and it was not set at all (a typo,
            a forgotten line); None when no replicas is what the user asked for.
    """

    __slots__ = ("_warned", "middleware", "overrides_warned", "replicas_unset", "started")

    def __init__(self, replicas_unset: str | None = None) -> None:
        self.started = False
        self.middleware = False
        self.replicas_unset = replicas_unset
        self.overrides_warned: set[int] = set()
        self._warned = False

    def session_opened(self) -> None:
        """A session is opened: the first one of a router never started warns."""
        if self.started or self._warned:
            return
        self._warned = True
        logger.warning("replica-router: a session was opened, but %s", NOT_STARTED)

    def no_replicas(self) -> str:
        """What having no replicas means, in words."""
        if self.replicas_unset is not None:
            return (
                f"no replicas: {self.replicas_unset} is not set, so every read goes to the "
                "primary; set it to the replicas' URLs (comma-separated), or set it empty "
                "to run without replicas"
            )
        return "no replicas configured: every read goes to the primary"

    async def start(self, topology: Topology, settings: RouterSettings) -> None:
        """Say what the router starts with; check the nodes ``require_at_start`` names.

        Raises:
            ConfigurationError: a required node refused the credentials or the database.
            PrimaryUnavailableError: the primary cannot be reached.
            NoHealthyReplicaError: a replica cannot be reached (``require_at_start="all"``).
        """
        if not topology.replicas:
            if self.replicas_unset is not None:
                logger.warning("replica-router: %s", self.no_replicas())
            else:
                logger.info("replica-router: %s", self.no_replicas())
        if settings.require_at_start != "none":
            await require_nodes(topology, settings)

    def warnings(self, settings: RouterSettings, replicas: int) -> tuple[str, ...]:
        """What is wrong with the set-up, for ``router.status()``."""
        found: list[str] = []
        if not self.started:
            found.append(NOT_STARTED)
        elif settings.read_your_writes != "off" and not self.middleware:
            found.append(_NO_MIDDLEWARE)
        if not replicas:
            found.append(self.no_replicas())
        return tuple(found)


async def _connect(node: Node, seconds: float) -> BaseException | None:
    """Open a connection of the node's own pool and run one query; the error, if any."""
    try:
        # The driver bounds the connection attempt; this bounds everything, DNS included.
        async with asyncio.timeout(seconds * 2):
            await query_value(node, "SELECT 1", seconds)
    except Exception as exc:
        return exc
    return None


async def require_nodes(topology: Topology, settings: RouterSettings) -> None:
    """Connect to the primary (``require_at_start="primary"``) or every node (``"all"``)
    through its own pool, once and at the same time; raise if any fails.

    Raises:
        ConfigurationError: a node refused the credentials or the database (fix the URL).
        PrimaryUnavailableError: the primary cannot be reached.
        NoHealthyReplicaError: a replica cannot be reached.
    """
    nodes = topology.nodes if settings.require_at_start == "all" else (topology.primary,)
    seconds = settings.connect_timeout
    errors = await asyncio.gather(*(_connect(node, seconds) for node in nodes))
    failed = [(node, exc) for node, exc in zip(nodes, errors, strict=True) if exc is not None]
    if not failed:
        return
    lines = []
    refused = False
    for node, exc in failed:
        found = refusal(exc)
        if found is not None:
            refused = True
            lines.append(
                f"{node.role.value} {node.name} refused the connection: {found[1]}; "
                "check the user, password and database in its URL"
            )
        elif isinstance(exc, TimeoutError):
            lines.append(f"{node.role.value} {node.name} did not answer within {2 * seconds:g} s")
        else:
            lines.append(f"{node.role.value} {node.name} cannot be reached: {describe(exc)}")
    message = (
        f"the router cannot start ({ENV_PREFIX}REQUIRE_AT_START={settings.require_at_start}):"
        "\n  " + "\n  ".join(lines)
    )
    error: ReplicaRouterError
    if refused:
        error = ConfigurationError(message)
    elif any(node is topology.primary for node, _ in failed):
        error = PrimaryUnavailableError(message, retry_after=settings.health_interval)
    else:
        error = NoHealthyReplicaError(message, retry_after=settings.health_interval)
    raise error from failed[0][1]
