"""The ``replica-router demo`` command: a local cluster, an app, live traffic and faults.

It starts a :class:`~replica_router.testing.LocalCluster` (a primary and streaming
replicas), serves a small notes app over a :class:`ReplicaRouter` with uvicorn on a
free loopback port, and runs a few HTTP clients against it. Every response says
which server answered, so the display counts reads and writes per node from the
clients' side. Then it injects faults in turn and checks that the router saw
each one: replay paused on a replica (it lags and stops getting reads), replay
resumed (it serves again), a replica killed with SIGKILL (it is marked down and
reads continue elsewhere), the replica started again (it is readmitted).

The exit status says whether everything behaved, so a script can run it.

Example::

    from replica_router._demo import run_demo

    raise SystemExit(run_demo(duration=45.0, replicas=2))
"""

# No ``from __future__ import annotations``: FastAPI resolves the demo app's
# annotations at run time, and they name classes local to build_app().
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from fastapi import FastAPI

from ._router import ReplicaRouter
from ._status import NodeStatus, RouterStatus
from .testing.cluster import LocalCluster

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["DemoSetupError", "run_demo"]

# Exit statuses.
OK = 0
MISBEHAVED = 1
SETUP_FAILED = 2
INTERRUPTED = 130

_CLIENTS = 3  # concurrent HTTP clients: enough to show the spread, light on 2 cores
_READS_PER_WRITE = 2
_THINK_SECONDS = 0.1  # each client's pause between rounds
_SAMPLE_SECONDS = 0.1  # how often the router's status is sampled
_GRACE_SECONDS = 15.0  # how long a phase may run past its share waiting for the router
_PHASE_SHARES = (0.2, 0.2, 0.15, 0.2, 0.25)

_MISSING_PACKAGES = (
    "the demo needs uvicorn, httpx and rich ({missing}); install them with "
    "pip install 'replica-router[embedded]' (or pip install uvicorn httpx rich)"
)


class DemoSetupError(Exception):
    """The demo cannot run here: a package or PostgreSQL binaries are missing."""


# -- what happened ------------------------------------------------------------------------


@dataclass(slots=True)
class _Request:
    """One request made by a demo client."""

    kind: str  # "read" or "write"
    started: float
    finished: float
    node: str | None  # the server that answered; None on error
    error: str | None = None
    expected: bool = False  # an error the phase's fault explains


@dataclass(slots=True)
class _Phase:
    """One step of the demo: an optional fault, then traffic, then a verdict."""

    title: str
    expectation: str
    share: float
    action: Callable[[], None] | None = None
    # When the router's status first showed the expected reaction.
    observe: Callable[[RouterStatus], bool] | None = None
    started: float = 0.0
    action_done: float = 0.0
    ended: float = 0.0
    observed_at: float | None = None
    action_error: str | None = None
    max_lag_seconds: float = 0.0
    max_lag_bytes: int = 0
    requests: list[_Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.started > 0 and self.ended == 0

    def reads_by(self, after: float | None = None) -> Counter[str]:
        """Successful reads per node, of requests started after ``after``."""
        return Counter(
            r.node
            for r in self.requests
            if r.kind == "read" and r.node is not None and (after is None or r.started > after)
        )


class _EventLog(logging.Handler):
    """Keeps the router's log messages (node up, down, lagging...) for the display."""

    def __init__(self, events: deque[str], clock: Callable[[], float]) -> None:
        super().__init__(logging.INFO)
        self._events = events
        self._clock = clock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._events.append(f"{self._clock():6.1f}s  router: {record.getMessage()}")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _capture_router_logs(handler: logging.Handler) -> Iterator[None]:
    logger = logging.getLogger("replica_router")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # The display shows them; printed lines would tear the live table.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# -- the app ------------------------------------------------------------------------------


def build_app(router: ReplicaRouter) -> FastAPI:
    """A small notes app whose every response names the server that answered."""
    from typing import Annotated

    from fastapi import Depends
    from pydantic import BaseModel
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    Writer = Annotated[AsyncSession, Depends(router.writer)]
    Reader = Annotated[AsyncSession, Depends(router.reader)]

    class NoteIn(BaseModel):
        body: str

    app = FastAPI(title="replica-router demo", lifespan=router.lifespan)
    app.include_router(router.health_routes())

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn, db: Writer) -> dict[str, Any]:
        query = text(
            "INSERT INTO demo_notes (body) VALUES (:body) RETURNING id, inet_server_port() AS port"
        )
        row = (await db.execute(query, {"body": note.body})).one()
        return {"id": row.id, "server_port": row.port}

    @app.get("/notes/latest")
    async def latest(db: Reader) -> dict[str, Any]:
        query = text(
            "SELECT inet_server_port() AS port, pg_is_in_recovery() AS in_recovery, "
            "(SELECT max(id) FROM demo_notes) AS newest"
        )
        row = (await db.execute(query)).one()
        return {"server_port": row.port, "in_recovery": row.in_recovery, "newest": row.newest}

    return app


# -- the demo -----------------------------------------------------------------------------


class _Demo:
    __slots__ = (
        "_interrupted",
        "_ports",
        "_started",
        "_stop",
        "cluster",
        "duration",
        "events",
        "failed_node",
        "interactive",
        "lagging_node",
        "out",
        "phase",
        "phases",
        "router",
        "status",
        "totals",
    )

    def __init__(
        self, cluster: LocalCluster, duration: float, out: TextIO, interactive: bool
    ) -> None:
        self.cluster = cluster
        self.duration = duration
        self.out = out
        self.interactive = interactive
        self.events: deque[str] = deque(maxlen=8)
        self._ports = {node.port: node.name for node in cluster.nodes}
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._interrupted = False
        self.router: ReplicaRouter | None = None
        self.status: RouterStatus | None = None
        # Per node for "read" and "write"; per kind of request for "error".
        self.totals: dict[str, Counter[str]] = {
            "read": Counter(),
            "write": Counter(),
            "error": Counter(),
        }
        self.lagging_node = cluster.replicas[0].name
        self.failed_node = cluster.replicas[-1].name
        self.phases = self._plan()
        self.phase: _Phase = self.phases[0]

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def clock(self) -> float:
        return time.monotonic() - self._started

    def event(self, message: str) -> None:
        line = f"{self.clock():6.1f}s  {message}"
        self.events.append(line)
        if not self.interactive:
            print(line, file=self.out, flush=True)

    def _plan(self) -> list[_Phase]:
        lagging, failed, cluster = self.lagging_node, self.failed_node, self.cluster

        def status_of(name: str) -> Callable[[RouterStatus], NodeStatus]:
            return lambda status: status.node(name)

        lag, down = status_of(lagging), status_of(failed)
        shares = _PHASE_SHARES
        return [
            _Phase(
                "baseline",
                "writes go to the primary, reads are spread over the replicas",
                shares[0],
            ),
            _Phase(
                f"replay paused on {lagging}",
                f"{lagging} falls behind while writes go on; the router stops reading from it",
                shares[1],
                action=lambda: cluster.pause_replay(lagging),
                observe=lambda s: not lag(s).healthy and lag(s).reason == "lagging",
            ),
            _Phase(
                f"replay resumed on {lagging}",
                f"{lagging} catches up and serves reads again",
                shares[2],
                action=lambda: cluster.resume_replay(lagging),
                observe=lambda s: lag(s).healthy,
            ),
            _Phase(
                f"{failed} killed (SIGKILL)",
                f"{failed} is marked down; reads go on on the other nodes",
                shares[3],
                action=lambda: cluster.kill_node(failed),
                observe=lambda s: not down(s).healthy,
            ),
            _Phase(
                f"{failed} started again",
                f"{failed} passes its health probes and serves reads again",
                shares[4],
                action=lambda: cluster.start_node(failed),
                observe=lambda s: down(s).healthy,
            ),
        ]

    def finish(self) -> None:
        self._stop.set()

    def interrupt(self) -> None:
        if not self._interrupted:
            self._interrupted = True
            self.event("interrupted: stopping")
        self._stop.set()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        import httpx

        from ._settings import RouterSettings

        settings = RouterSettings.defaults(
            health_interval=0.25,
            health_timeout=1.0,
            readmit_after=2,
            max_lag_seconds=1.0,
            max_lag_bytes=1024 * 1024,
            pool_size=4,
            max_overflow=4,
            connect_timeout=2.0,
            checkout_timeout=5.0,
        )
        router = ReplicaRouter(
            self.cluster.primary_url, self.cluster.replica_urls, settings=settings
        )
        self.router = router
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.interrupt)
        try:
            async with self._serve(build_app(router)) as base_url:
                self.event(f"notes app serving on {base_url} (routes /notes, /health/nodes)")
                limits = httpx.Limits(max_connections=_CLIENTS * 2)
                async with httpx.AsyncClient(
                    base_url=base_url, timeout=5.0, limits=limits
                ) as client:
                    tasks = [asyncio.create_task(self._client(client, i)) for i in range(_CLIENTS)]
                    tasks.append(asyncio.create_task(self._sample()))
                    try:
                        await self._run_phases()
                    finally:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    @contextlib.asynccontextmanager
    async def _serve(self, app: FastAPI) -> AsyncIterator[str]:
        import uvicorn

        class _Server(uvicorn.Server):
            # The demo handles SIGINT itself; uvicorn's handler would re-raise it.
            @contextlib.contextmanager
            def capture_signals(self) -> Generator[None, None, None]:
                yield

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_config=None, log_level="critical", access_log=False, lifespan="on"
        )
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()  # raises what stopped it
                    raise DemoSetupError("the demo app did not start")
                await asyncio.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            try:
                await asyncio.wait_for(task, 15.0)
            except TimeoutError:
                server.force_exit = True
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            sock.close()

    async def _run_phases(self) -> None:
        for index, phase in enumerate(self.phases, start=1):
            if self._stop.is_set():
                return
            self.phase = phase
            phase.started = time.monotonic()
            self.event(f"phase {index}/{len(self.phases)}: {phase.title}")
            if phase.action is not None:
                try:
                    await asyncio.to_thread(phase.action)
                except Exception as exc:
                    phase.action_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    self.event(f"the fault could not be injected: {phase.action_error}")
            phase.action_done = time.monotonic()
            deadline = phase.started + phase.share * self.duration
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= deadline + _GRACE_SECONDS:
                    break
                if now >= deadline and not self._evaluate(phase):
                    break
                await asyncio.sleep(_SAMPLE_SECONDS)
            phase.ended = time.monotonic()
            self._evaluate(phase)
            verdict = "ok" if not phase.problems else "; ".join(phase.problems)
            self.event(f"phase {index} done: {verdict}")
        self._stop.set()

    async def _client(self, client: Any, number: int) -> None:
        round_ = 0
        # Spread the clients' rounds over the think time.
        await asyncio.sleep(_THINK_SECONDS * number / _CLIENTS)
        while not self._stop.is_set():
            round_ += 1
            await self._request(client, "write", f"note {round_} from client {number}")
            for _ in range(_READS_PER_WRITE):
                await self._request(client, "read", None)
            await asyncio.sleep(_THINK_SECONDS)

    async def _request(self, client: Any, kind: str, body: str | None) -> None:
        import httpx

        phase = self.phase
        started = time.monotonic()
        node: str | None = None
        error: str | None = None
        try:
            if kind == "write":
                response = await client.post("/notes", json={"body": body})
            else:
                response = await client.get("/notes/latest")
            if response.status_code >= 400:
                error = f"HTTP {response.status_code}"
            else:
                node = self._ports.get(int(response.json()["server_port"]), "unknown")
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        request = _Request(kind, started, time.monotonic(), node, error)
        if phase.running:
            phase.requests.append(request)
        if node is not None:
            self.totals[kind][node] += 1
        else:
            self.totals["error"][kind] += 1

    async def _sample(self) -> None:
        assert self.router is not None
        while True:
            status = self.router.status()
            self.status = status
            phase = self.phase
            if phase.running:
                lag = status.node(self.lagging_node)
                phase.max_lag_seconds = max(phase.max_lag_seconds, lag.lag_seconds or 0.0)
                phase.max_lag_bytes = max(phase.max_lag_bytes, lag.lag_bytes or 0)
                if (
                    phase.observe is not None
                    and phase.observed_at is None
                    and phase.action_done > 0
                    and phase.observe(status)
                ):
                    phase.observed_at = time.monotonic()
                    self.event(
                        f"router reacted {phase.observed_at - phase.action_done:.1f} s "
                        "after the fault"
                    )
            await asyncio.sleep(_SAMPLE_SECONDS)

    # -- verdicts --------------------------------------------------------------------------

    def _evaluate(self, phase: _Phase) -> bool:
        """Fill ``phase.problems``; True while something expected has not happened yet."""
        problems: list[str] = []
        if phase.action_error is not None:
            problems.append(f"the fault could not be injected: {phase.action_error}")
        index = self.phases.index(phase)
        replicas = [node.name for node in self.cluster.replicas]
        primary = self.cluster.primary.name
        # Errors: reads in flight on the killed replica when it died are expected.
        killed = index == 3
        for request in phase.requests:
            request.expected = (
                killed
                and request.kind == "read"
                and request.error is not None
                and request.started <= phase.action_done + 1.0
            )
        expected = [r for r in phase.requests if r.expected]
        unexpected = [r for r in phase.requests if r.error is not None and not r.expected]
        if unexpected:
            kinds = Counter(f"{r.kind} {r.error}" for r in unexpected)
            problems.append(
                "client errors: " + ", ".join(f"{n} x {k}" for k, n in kinds.most_common())
            )
        if len(expected) > _CLIENTS * 2:
            problems.append(f"{len(expected)} reads failed when {self.failed_node} was killed")
        stray = [r for r in phase.requests if r.kind == "write" and r.node not in (None, primary)]
        if stray:
            problems.append(f"{len(stray)} writes were answered by a replica")
        waiting = False
        if phase.observe is not None and phase.observed_at is None:
            problems.append("the router did not react: " + phase.expectation)
            waiting = True
        after = phase.observed_at
        if index == 0:
            reads = phase.reads_by()
            idle = [name for name in replicas if reads[name] == 0]
            if idle:
                problems.append("no reads served by " + ", ".join(idle))
                waiting = True
        elif index in (1, 3) and after is not None:
            target = self.lagging_node if index == 1 else self.failed_node
            reads = phase.reads_by(after)
            if reads[target]:
                problems.append(f"{reads[target]} reads still went to {target}")
            others = sum(n for name, n in reads.items() if name != target)
            if not others:
                problems.append("no reads were served after the router reacted")
                waiting = True
        elif index in (2, 4) and after is not None:
            target = self.lagging_node if index == 2 else self.failed_node
            if not phase.reads_by(after)[target]:
                problems.append(f"{target} served no reads after it came back")
                waiting = True
        phase.problems = problems
        return waiting

    # -- display ---------------------------------------------------------------------------

    def _rows(self) -> list[list[str]]:
        rows: list[list[str]] = []
        status = self.status
        if status is None:
            return rows
        phase_reads = self.phase.reads_by()
        phase_writes = Counter(
            r.node for r in self.phase.requests if r.kind == "write" and r.node is not None
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
                    f"{self.totals['read'][node.name]} (+{phase_reads[node.name]})",
                    f"{self.totals['write'][node.name]} (+{phase_writes[node.name]})",
                ]
            )
        return rows

    def _header(self) -> str:
        phase = self.phase
        index = self.phases.index(phase) + 1
        left = max(0.0, phase.started + phase.share * self.duration - time.monotonic())
        errors = self.totals["error"]
        return (
            f"phase {index}/{len(self.phases)}: {phase.title} ({left:.0f} s left)\n"
            f"expect: {phase.expectation}\n"
            f"client errors: {sum(errors.values())} (reads {errors['read']}, "
            f"writes {errors['write']})"
        )

    _COLUMNS = ("node", "role", "health", "reason", "lag", "reads (+phase)", "writes (+phase)")

    def render(self) -> "RenderableType":
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="replica-router demo", title_justify="left")
        for column in self._COLUMNS:
            # A down node's reason can be long; the full text is in the event log.
            wide = column == "reason"
            table.add_column(
                column,
                no_wrap=True,
                max_width=32 if wide else None,
                overflow="ellipsis" if wide else "fold",
            )
        for row in self._rows():
            style = "red" if row[2] == "UNHEALTHY" else None
            table.add_row(*row, style=style)
        return Group(Text(self._header()), table, Text("\n".join(self.events)))

    def plain(self) -> str:
        rows = [list(self._COLUMNS)]
        for row in self._rows():
            reason = row[3]
            rows.append([*row[:3], reason if len(reason) <= 40 else reason[:37] + "...", *row[4:]])
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        return self._header() + "\n" + "\n".join(lines)

    async def display(self) -> None:
        """Refresh the live table (or print it now and then) until the demo stops."""
        if self.interactive:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.out)
            with Live(self.render(), console=console, auto_refresh=False) as live:
                while not self._stop.is_set():
                    live.update(self.render(), refresh=True)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.25)
                live.update(self.render(), refresh=True)
        else:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 3.0)
                print(self.plain() + "\n", file=self.out, flush=True)

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> tuple[str, bool]:
        lines = [f"replica-router demo: summary ({self.clock():.1f} s)"]
        ports = ", ".join(f"{node.name} :{node.port}" for node in self.cluster.nodes)
        lines.append(f"  cluster: {ports}")
        ok = True
        for index, phase in enumerate(self.phases, start=1):
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
                    f"     {self.lagging_node} lag peaked at {phase.max_lag_seconds:.1f} s / "
                    f"{_size(phase.max_lag_bytes)}"
                )
            if phase.problems:
                ok = False
                lines.extend(f"     PROBLEM: {problem}" for problem in phase.problems)
            else:
                lines.append("     ok")
        if self._interrupted:
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


def _check_packages() -> None:
    import importlib.util

    missing = [m for m in ("uvicorn", "httpx", "rich") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoSetupError(_MISSING_PACKAGES.format(missing=", ".join(missing)))


async def _main(demo: _Demo) -> None:
    display = asyncio.create_task(demo.display())
    try:
        await demo.run()
    finally:
        demo.finish()
        await display


def run_demo(
    duration: float = 45.0,
    replicas: int = 2,
    *,
    out: TextIO | None = None,
    interactive: bool | None = None,
) -> int:
    """Run the demo and return its exit status.

    Args:
        duration: seconds of traffic and faults (cluster start-up comes on top).
        replicas: streaming replicas to start, at least 2.
        out: where the display and the summary go (default: standard output).
        interactive: a refreshing table (default: when ``out`` is a terminal), or
            plain periodic prints.

    Returns:
        0 when everything behaved, 1 when something did not, 2 when the demo could
        not start, 130 when interrupted.
    """
    out = out or sys.stdout
    if interactive is None:
        interactive = out.isatty()
    try:
        _check_packages()
        from .testing import LocalCluster, PostgresNotFoundError
    except DemoSetupError as exc:
        print(f"replica-router demo: {exc}", file=sys.stderr)
        return SETUP_FAILED
    print(
        f"replica-router demo: starting a primary and {replicas} replicas...", file=out, flush=True
    )
    started = time.monotonic()
    demo: _Demo | None = None
    try:
        with LocalCluster(replicas=replicas) as cluster:
            cluster.execute(
                "primary",
                "CREATE TABLE demo_notes (id bigserial PRIMARY KEY, body text NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())",
            )
            cluster.wait_for_replay()
            print(
                f"replica-router demo: cluster up in {time.monotonic() - started:.1f} s "
                f"in {cluster.base_dir} (binaries: {cluster.bin_dir})",
                file=out,
                flush=True,
            )
            demo = _Demo(cluster, duration, out, interactive)
            with _capture_router_logs(_EventLog(demo.events, demo.clock)):
                asyncio.run(_main(demo))
            text, ok = demo.summary()
        # The cluster is stopped once the block has ended.
        print(text, file=out, flush=True)
        print(
            f"replica-router demo: cluster stopped; total {time.monotonic() - started:.1f} s",
            file=out,
            flush=True,
        )
    except KeyboardInterrupt:
        if demo is not None:
            print(demo.summary()[0], file=out, flush=True)
        print("replica-router demo: interrupted; cluster stopped", file=out, flush=True)
        return INTERRUPTED
    except PostgresNotFoundError as exc:
        print(f"replica-router demo: {exc}", file=sys.stderr)
        return SETUP_FAILED
    if demo.interrupted:
        return INTERRUPTED
    return OK if ok else MISBEHAVED
