"""What the demo shows: a live table of the nodes, periodic plain prints, and the summary."""

import time
from collections import Counter
from typing import TYPE_CHECKING

from .._settings import RouterSettings
from .scenario import Demo

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["display", "plain", "render", "summary"]


def _rows(demo: Demo) -> list[list[str]]:
    rows: list[list[str]] = []
    status = demo.status
    if status is None:
        return rows
    phase_reads = demo.phase.reads_by()
    phase_writes = Counter(
        r.node for r in demo.phase.requests if r.kind == "write" and r.node is not None
    )
    for node in status.nodes:
        lag = "-"
        down = (node.reason or "").startswith("down")
        if node.role == "replica" and node.lag_bytes is not None and not down:
            lag = f"{node.lag_seconds or 0.0:.1f} s / {_size(node.lag_bytes)}"
        role = node.server_role or "?"
        if node.server_role is not None and node.server_role != node.role:
            role = f"{role} (configured {node.role})"
        rows.append(
            [
                node.name,
                role,
                "healthy" if node.healthy else "UNHEALTHY",
                node.reason or "",
                lag,
                f"{demo.totals['read'][node.name]} (+{phase_reads[node.name]})",
                f"{demo.totals['write'][node.name]} (+{phase_writes[node.name]})",
            ]
        )
    return rows


def _header(demo: Demo) -> str:
    phase = demo.phase
    index = demo.phases.index(phase) + 1
    left = max(0.0, phase.started + phase.share * demo.duration - time.monotonic())
    errors = demo.totals["error"]
    legend = "".join(f"\n  {line}" for line in _legend(demo))
    page = f"status page: {demo.page_url}\n" if demo.page_url else ""
    return (
        f"{page}{_settings(demo)}\n"
        f"phase {index}/{len(demo.phases)}: {phase.title} ({left:.0f} s left)\n"
        f"expect: {phase.expectation}\n"
        f"client errors: {sum(errors.values())} (reads {errors['read']}, "
        f"writes {errors['write']})\n"
        f"{_decisions(demo)}{legend}"
    )


# What each routing decision means, for the reader of the screen.
_MEANINGS = {
    "replica": "a fit replica, known to have what this client needs",
    "replica_after_check": (
        "a replica whose replay position was re-read first: it had the client's last write"
    ),
    "replica_after_wait": "a replica, after waiting (up to CONSISTENCY_WAIT) for it to replay",
    "primary_behind": "the primary: no replica replayed the client's last write in time",
    "primary_after_write": "the primary: this request wrote (read_your_writes=request)",
    "primary_fallback": "the primary: no replica was fit (down, lagging, none configured)",
    "token_ignored": "a position that was malformed, badly signed or beyond the primary",
}


def _legend(demo: Demo) -> list[str]:
    """The meaning of every decision taken so far."""
    if demo.router is None:
        return []
    seen: Counter[str] = Counter()
    for policy in demo.router.status().reads:
        seen.update({name: n for name, n in policy.decisions.items() if n})
    return [f"{name}: {meaning}" for name, meaning in _MEANINGS.items() if seen[name]]


def _settings(demo: Demo) -> str:
    """The demo's own settings, and the defaults they stand in for."""
    if demo.router is None:
        return "settings: -"
    s, d = demo.router.settings, RouterSettings.defaults()
    return (
        f"settings (demo; defaults in brackets): probes every {s.health_interval:g} s "
        f"[{d.health_interval:g}], lag bound {s.max_lag_seconds:g} s "
        f"[{d.max_lag_seconds:g}] or {_size(s.max_lag_bytes)} [{_size(d.max_lag_bytes)}]: "
        "short, so each fault shows within seconds"
    )


def _decisions(demo: Demo) -> str:
    """How reads were routed so far, read-your-writes included."""
    if demo.router is None:
        return "reads: -"
    status = demo.router.status()
    counts = Counter[str]()
    for policy in status.reads:
        counts.update(policy.decisions)
    shown = ", ".join(f"{name} {n}" for name, n in counts.items() if n)
    return f"reads by decision (read-your-writes: {status.read_your_writes}): {shown or '-'}"


_COLUMNS = ("node", "role", "health", "reason", "lag", "reads (+phase)", "writes (+phase)")


def render(demo: Demo) -> "RenderableType":
    """The live view: a header, a table of the nodes, and the latest events."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="replica-router demo", title_justify="left")
    for column in _COLUMNS:
        # A down node's reason can be long; the full text is in the event log.
        wide = column == "reason"
        table.add_column(
            column,
            no_wrap=True,
            max_width=32 if wide else None,
            overflow="ellipsis" if wide else "fold",
        )
    for row in _rows(demo):
        style = "red" if row[2] == "UNHEALTHY" else None
        table.add_row(*row, style=style)
    return Group(Text(_header(demo)), table, Text("\n".join(demo.events)))


def plain(demo: Demo) -> str:
    """The header and the table of the nodes as plain text, for a log or a pipe."""
    rows = [list(_COLUMNS)]
    for row in _rows(demo):
        reason = row[3]
        rows.append([*row[:3], reason if len(reason) <= 40 else reason[:37] + "...", *row[4:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return _header(demo) + "\n" + "\n".join(lines)


async def display(demo: Demo) -> None:
    """Refresh the live table (or print it now and then) until the demo stops."""
    if demo.interactive:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=demo.out)
        with Live(render(demo), console=console, auto_refresh=False) as live:
            while not demo.stopped:
                live.update(render(demo), refresh=True)
                await demo.wait_stopped(0.25)
            live.update(render(demo), refresh=True)
    else:
        while not demo.stopped:
            await demo.wait_stopped(3.0)
            print(plain(demo) + "\n", file=demo.out, flush=True)


def summary(demo: Demo) -> tuple[str, bool]:
    """The report of every phase, and whether everything behaved."""
    lines = [f"replica-router demo: summary ({demo.clock():.1f} s)"]
    ports = ", ".join(f"{node.name} :{node.port}" for node in demo.cluster.nodes)
    lines.append(f"  cluster: {ports}")
    ok = True
    for index, phase in enumerate(demo.phases, start=1):
        if phase.started == 0:
            lines.append(f"  {index}. {phase.title}: not run")
            ok = False
            continue
        seconds = (phase.ended or time.monotonic()) - phase.started
        writes = Counter(r.node for r in phase.requests if r.kind == "write" and r.node)
        reads = phase.reads_by()
        errors = [r for r in phase.requests if r.error is not None]
        expected = sum(1 for r in errors if r.expected)
        lines.append(f"  {index}. {phase.title} ({seconds:.1f} s)")
        lines.append(f"     expected: {phase.expectation}")
        lines.append(
            f"     writes: {_counts(writes)}; reads: {_counts(reads)}; "
            f"client errors: {len(errors)} ({expected} expected)"
        )
        if phase.observed_at is not None:
            reacted = phase.observed_at - phase.action_done
            lines.append(f"     the router reacted {reacted:.1f} s after the fault")
            if phase.observe is not None and phase.action is not None:
                after = phase.reads_by(phase.observed_at)
                lines.append(f"     reads after that: {_counts(after)}")
        if index == 2:
            lines.append(
                f"     {demo.lagging_node} lag peaked at {phase.max_lag_seconds:.1f} s / "
                f"{_size(phase.max_lag_bytes)}"
            )
        if phase.problems:
            ok = False
            lines.extend(f"     PROBLEM: {problem}" for problem in phase.problems)
        else:
            lines.append("     ok")
    lines.append(f"  {_decisions(demo)}")
    lines.extend(f"    {line}" for line in _legend(demo))
    lines.append(f"  {_settings(demo)}")
    if demo.interrupted:
        lines.append("result: interrupted")
    elif ok:
        lines.append("result: OK, every fault was seen by the router and reads kept flowing")
    else:
        lines.append("result: FAILED, see the problems above")
    return "\n".join(lines), ok


def _counts(counter: Counter[str]) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items()))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} kB"
    return f"{n / 1024 / 1024:.1f} MB"
