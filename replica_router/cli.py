"""The ``replica-router`` command: ``check`` a configuration, run the ``demo``.

``replica-router check`` reads the same ``REPLICA_ROUTER_*`` settings as the app,
connects to every node and prints a table: node, URL (password masked),
reachable, in recovery, lag behind the primary, server version. It exits 0 when
every node is reachable and in the role it is configured as, 1 otherwise, and 2
when the settings are invalid (an unknown ``REPLICA_ROUTER_*`` variable too). No
replicas is a problem unless asked for: ``REPLICA_ROUTER_REPLICA_URLS`` set, and
empty. With ``REPLICA_ROUTER_PATRONI_URL`` the replicas are Patroni's streaming
members (what the router would find), and with ``REPLICA_ROUTER_DNS_DISCOVERY`` a
host that resolves to several addresses is one node per address, as in the router.
``--json`` prints the same as JSON.

``replica-router demo`` starts a local primary and replicas, an example app and
live traffic, injects faults and shows the router reacting (see ``--help``).

Example::

    $ export REPLICA_ROUTER_PRIMARY_URL=postgresql://app:secret@db-rw:5432/app
    $ export REPLICA_ROUTER_REPLICA_URLS=postgresql://app:secret@db-ro:5432/app
    $ replica-router check
    $ replica-router check --json | jq .ok
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import URL

from ._discovery import dns_name, fetch_patroni_members, member_url, resolve_addresses
from ._drivers import ProbeConnection, driver_for
from ._exceptions import ConfigurationError
from ._health import describe
from ._lifecycle import primary_url_of
from ._nodes import Role
from ._settings import ENV_PREFIX, RouterSettings
from ._urls import mask_url, split_replica_options

__all__ = ["CheckResult", "NodeCheck", "check", "main"]

# Exit statuses of ``check``.
CHECK_OK = 0
CHECK_FAILED = 1
BAD_SETTINGS = 2

_CHECK_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END)::text AS lsn,
       current_setting('server_version') AS server_version,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused,
       CASE WHEN pg_is_in_recovery()
            THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
       END AS replay_age
"""


@dataclass(slots=True)
class NodeCheck:
    """What ``check`` found out about one node.

    ``lag_bytes`` is ``pg_wal_lsn_diff(primary's pg_current_wal_lsn(), replica's
    pg_last_wal_replay_lsn())``, at least 0. ``lag_seconds`` is 0 for a replica that
    has replayed everything, else the time since it last replayed a transaction.
    """

    name: str
    role: str
    url: str
    reachable: bool = False
    in_recovery: bool | None = None
    server_role: str | None = None
    replay_paused: bool | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    server_version: str | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class CheckResult:
    """Every node, primary first; ``ok`` when all are reachable and in their roles, and
    the configuration has no problem of its own (``problems``: no replicas, unasked)."""

    nodes: list[NodeCheck]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not node.problems for node in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (URLs masked)."""
        return {
            "ok": self.ok,
            "nodes": [asdict(node) for node in self.nodes],
            "notes": self.notes,
            "problems": self.problems,
        }


def _lsn(text: str | None) -> int | None:
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


async def _connect(url: URL, seconds: float) -> ProbeConnection:
    connecting = driver_for(url).connect(
        url, {}, connect_timeout=seconds, application_name="replica-router-check"
    )
    # The driver's own timeout covers one connection attempt; this bounds the whole.
    return await asyncio.wait_for(connecting, seconds * 2)


async def _close(conn: ProbeConnection, seconds: float) -> None:
    try:
        await asyncio.wait_for(conn.close(), seconds)
    except Exception:
        conn.terminate()


async def _probe(node: NodeCheck, conn: ProbeConnection, seconds: float) -> int | None:
    """Query one connected node; return its WAL position (replay position on a replica)."""
    try:
        row = await asyncio.wait_for(conn.fetch_row(_CHECK_SQL), seconds)
    except Exception as exc:
        node.reachable = False
        node.error = describe(exc)
        return None
    in_recovery, lsn, server_version, replay_paused, replay_age = row
    node.reachable = True
    node.in_recovery = bool(in_recovery)
    node.server_role = "replica" if node.in_recovery else "primary"
    node.server_version = str(server_version)
    node.replay_paused = replay_paused
    if replay_age is not None:
        node.lag_seconds = float(replay_age)
    return _lsn(lsn)


async def check(
    settings: RouterSettings,
    *,
    connect_timeout: float | None = None,
    env_prefix: str = ENV_PREFIX,
) -> CheckResult:
    """Connect to every configured node and report reachability, role and lag.

    Args:
        settings: the router's settings; ``primary_url`` must be set.
        connect_timeout: seconds for each connection and query (default: the
            settings' ``connect_timeout``).
        env_prefix: the prefix the settings were read with (to name variables).

    Returns:
        One entry per node, the primary first; every connection is closed.
    """
    if settings.primary_url is None:
        raise ConfigurationError("primary_url is not set")
    seconds = connect_timeout if connect_timeout is not None else settings.connect_timeout
    targets: list[tuple[NodeCheck, URL]] = [
        (
            NodeCheck("primary", Role.PRIMARY.value, mask_url(settings.primary_url)),
            settings.primary_url,
        )
    ]
    notes: list[str] = []
    problems: list[str] = []
    replicas = await _replica_targets(
        settings, settings.primary_url, seconds, env_prefix, notes, problems
    )
    for name, url in replicas:
        targets.append((NodeCheck(name, Role.REPLICA.value, mask_url(url)), url))
    result = CheckResult([node for node, _ in targets], problems=problems, notes=notes)
    if not settings.replica_urls and not settings.patroni_url:
        variable = f"{env_prefix}REPLICA_URLS"
        if "replica_urls" in settings.model_fields_set:  # set, and empty: as asked
            result.notes.append(
                f"no replicas ({variable} is empty): every read goes to the primary"
            )
        else:
            result.problems.append(
                f"no replicas: {variable} is not set, so every read would go to the primary; "
                "set it to the replicas' URLs (comma-separated), or set it empty to run "
                "without replicas"
            )

    async def connect(node: NodeCheck, url: URL) -> ProbeConnection | None:
        try:
            return await _connect(url, seconds)
        except Exception as exc:
            node.error = describe(exc)
            return None

    connections = await asyncio.gather(*(connect(node, url) for node, url in targets))
    try:
        positions: list[int | None] = [None] * len(targets)
        # The primary first: replicas measured after it are never shown ahead of it.
        if connections[0] is not None:
            positions[0] = await _probe(result.nodes[0], connections[0], seconds)
        replica_positions = await asyncio.gather(
            *(
                _probe(node, conn, seconds)
                for (node, _), conn in zip(targets[1:], connections[1:], strict=True)
                if conn is not None
            )
        )
        probed = iter(replica_positions)
        for index, conn in enumerate(connections[1:], start=1):
            if conn is not None:
                positions[index] = next(probed)
    finally:
        await asyncio.gather(*(_close(c, seconds) for c in connections if c is not None))

    primary_lsn = positions[0] if result.nodes[0].server_role == "primary" else None
    for node, position in zip(result.nodes, positions, strict=True):
        if node.role == Role.PRIMARY.value:
            if node.reachable and node.in_recovery:
                node.problems.append("configured as the primary but in recovery (a replica)")
        else:
            if node.reachable and not node.in_recovery:
                node.problems.append("configured as a replica but not in recovery (a primary)")
            if node.in_recovery and primary_lsn is not None and position is not None:
                node.lag_bytes = max(0, primary_lsn - position)
                if node.lag_bytes == 0:
                    node.lag_seconds = 0.0
            else:
                node.lag_seconds = None
            if node.lag_bytes is not None and node.lag_bytes > settings.max_lag_bytes:
                result.notes.append(
                    f"{node.name} is {node.lag_bytes} bytes behind (max_lag_bytes is "
                    f"{settings.max_lag_bytes}): the router would send it no reads"
                )
            if node.replay_paused:
                result.notes.append(f"{node.name}: WAL replay is paused")
        if not node.reachable:
            node.problems.insert(0, f"unreachable: {node.error or 'no answer'}")
    return result


def _yes_no(value: bool | None, yes: str = "yes", no: str = "no") -> str:
    return "-" if value is None else (yes if value else no)


def format_table(result: CheckResult) -> str:
    """The check's result as a plain text table, then its problems and notes."""
    header = ["node", "url", "reachable", "in recovery", "lag", "version"]
    rows = [header]
    for node in result.nodes:
        if node.lag_bytes is None:
            lag = "-"
        else:
            seconds = "?" if node.lag_seconds is None else f"{node.lag_seconds:.1f} s"
            lag = f"{node.lag_bytes} B / {seconds}"
        in_recovery = "-"
        if node.in_recovery is not None:
            in_recovery = f"{_yes_no(node.in_recovery)} ({node.server_role})"
        rows.append(
            [
                node.name,
                node.url,
                _yes_no(node.reachable),
                in_recovery,
                lag,
                node.server_version or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for node in result.nodes:
        lines.extend(f"problem: {node.name}: {problem}" for problem in node.problems)
    lines.extend(f"problem: {problem}" for problem in result.problems)
    lines.extend(f"note: {note}" for note in result.notes)
    replicas = len(result.nodes) - 1
    scope = "" if replicas else "; no replicas, so every read goes to the primary"
    failed = sum(1 for node in result.nodes if node.problems)
    if result.ok:
        lines.append(
            f"ok: {len(result.nodes)} nodes reachable and in their configured roles{scope}"
        )
    elif failed:
        lines.append(f"failed: {failed} of {len(result.nodes)} nodes have problems{scope}")
    else:
        lines.append(f"failed: no replicas configured ({len(result.nodes)} nodes reachable)")
    return "\n".join(lines)


async def _replica_targets(
    settings: RouterSettings,
    primary: URL,
    seconds: float,
    prefix: str,
    notes: list[str],
    problems: list[str],
) -> list[tuple[str, URL]]:
    """The replicas as the router would find them: the configured URLs, or Patroni's
    streaming members; with DNS discovery, one per address."""
    found: list[tuple[str, URL]] = []
    if settings.patroni_url:
        try:
            members = await fetch_patroni_members(settings.patroni_url, seconds)
        except OSError as exc:
            problems.append(f"{prefix}PATRONI_URL: {exc}; the router would keep no replicas")
            return []
        leader = next((m for m in members if m.leader), None)
        readable = [m for m in members if m.readable]
        notes.append(
            f"Patroni lists {len(members)} members: leader "
            f"{leader.name if leader else 'none'}, {len(readable)} streaming replica(s)"
            + "".join(
                f"; {m.name} is not streaming" for m in members if not m.leader and not m.streaming
            )
        )
        if not readable:
            problems.append(
                "Patroni lists no streaming replica: every read would go to the primary"
            )
        found = [(m.name, member_url(primary, m)) for m in readable]
    else:
        for index, raw in enumerate(settings.replica_urls, start=1):
            url, name, _ = split_replica_options(raw, what=f"replica {index}")
            found.append((name or f"replica-{index}", url))
    if not settings.dns_discovery:
        return found
    expanded: list[tuple[str, URL]] = []
    for name, url in found:
        host = dns_name(url)
        if host is None:
            expanded.append((name, url))
            continue
        try:
            async with asyncio.timeout(seconds):
                addresses = await resolve_addresses(host, url.port or 5432)
        except OSError as exc:  # socket.gaierror, and TimeoutError
            problems.append(f"{name}: {host} does not resolve ({str(exc) or type(exc).__name__})")
            expanded.append((name, url))
            continue
        expanded += [(f"{name}@{address}", url.set(host=address)) for address in addresses]
    return expanded


def _run_check(args: argparse.Namespace) -> int:
    prefix: str = args.env_prefix
    try:
        settings = RouterSettings(_env_prefix=prefix)
        primary_url_of(settings, prefix)
    except ConfigurationError as exc:
        print(f"replica-router check: {exc}", file=sys.stderr)
        return BAD_SETTINGS
    result = asyncio.run(check(settings, connect_timeout=args.timeout, env_prefix=prefix))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result))
    return CHECK_OK if result.ok else CHECK_FAILED


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(duration=args.duration, replicas=args.replicas)


def _positive(minimum: float) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum:g}, got {text!r}")
        return value

    return parse


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 2 <= value <= 5:
        raise argparse.ArgumentTypeError(f"expected 2 to 5 replicas, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``replica-router``."""
    parser = argparse.ArgumentParser(
        prog="replica-router",
        description="Read/write splitting for FastAPI and SQLAlchemy on PostgreSQL replicas.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check_parser = commands.add_parser(
        "check",
        help="connect to every configured node and report role and lag",
        description=(
            "Read the REPLICA_ROUTER_* settings (and .env) as the app does, connect to "
            "every node and print node, masked URL, reachable, in recovery, lag and server "
            "version. Exit status: 0 all reachable and in their configured roles, 1 not "
            "(or no replicas without REPLICA_ROUTER_REPLICA_URLS set empty), 2 invalid "
            "settings."
        ),
    )
    check_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check_parser.add_argument(
        "--env-prefix",
        default=ENV_PREFIX,
        metavar="PREFIX",
        help=f"prefix of the settings' environment variables (default {ENV_PREFIX})",
    )
    check_parser.add_argument(
        "--timeout",
        type=_positive(0.1),
        default=None,
        metavar="SECONDS",
        help="seconds to connect to and query each node (default: the connect_timeout setting)",
    )
    check_parser.set_defaults(handler=_run_check)
    demo_parser = commands.add_parser(
        "demo",
        help="a local cluster, an example app, live traffic and faults",
        description=(
            "Start a local primary and replicas, serve an example app over replica-router, "
            "send it traffic and inject faults (replay paused, a replica killed and started "
            "again), showing where reads and writes go. Exit status 0 when the router "
            "handled every fault as expected."
        ),
    )
    demo_parser.add_argument(
        "--duration",
        type=_positive(10.0),
        default=45.0,
        metavar="SECONDS",
        help="seconds of traffic and faults, at least 10 (default 45; start-up comes on top)",
    )
    demo_parser.add_argument(
        "--replicas",
        type=_replica_count,
        default=2,
        metavar="N",
        help="streaming replicas to start, 2 to 5 (default 2)",
    )
    demo_parser.set_defaults(handler=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``replica-router`` command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
