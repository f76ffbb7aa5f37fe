"""The demo's scenario: traffic from a few HTTP clients, faults in phases, and verdicts."""

import asyncio
import contextlib
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, TextIO

from .._router import ReplicaRouter
from .._status import NodeStatus, RouterStatus
from ..testing.cluster import LocalCluster
from .app import build_app, serve
from .records import Phase, Request

__all__ = ["Demo"]

_CLIENTS = 3  # concurrent HTTP clients: enough to show the spread, light on 2 cores
_READS_PER_WRITE = 2
_THINK_SECONDS = 0.1  # each client's pause between rounds
_SAMPLE_SECONDS = 0.1  # how often the router's status is sampled
_GRACE_SECONDS = 15.0  # how long a phase may run past its share waiting for the router
_PHASE_SHARES = (0.2, 0.2, 0.15, 0.2, 0.25)


class Demo:
    """One run of the demo over a started cluster: its phases, traffic and what it saw."""

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
        "page_url",
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
        self.page_url: str | None = None  # the status page, once the app serves
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
        self.phase: Phase = self.phases[0]

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self, seconds: float) -> None:
        """Return when the demo stops, or after ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def clock(self) -> float:
        return time.monotonic() - self._started

    def event(self, message: str) -> None:
        line = f"{self.clock():6.1f}s  {message}"
        self.events.append(line)
        if not self.interactive:
            print(line, file=self.out, flush=True)

    def _plan(self) -> list[Phase]:
        lagging, failed, cluster = self.lagging_node, self.failed_node, self.cluster

        def status_of(name: str) -> Callable[[RouterStatus], NodeStatus]:
            return lambda status: status.node(name)

        lag, down = status_of(lagging), status_of(failed)
        shares = _PHASE_SHARES
        return [
            Phase(
                "baseline",
                "writes go to the primary, reads are spread over the replicas",
                shares[0],
            ),
            Phase(
                f"replay paused on {lagging}",
                f"{lagging} falls behind while writes go on; the router stops reading from it",
                shares[1],
                action=lambda: cluster.pause_replay(lagging),
                observe=lambda s: not lag(s).healthy and lag(s).reason == "lagging",
            ),
            Phase(
                f"replay resumed on {lagging}",
                f"{lagging} catches up and serves reads again",
                shares[2],
                action=lambda: cluster.resume_replay(lagging),
                observe=lambda s: lag(s).healthy,
            ),
            Phase(
                f"{failed} killed (SIGKILL)",
                f"{failed} is marked down; reads go on on the other nodes",
                shares[3],
                action=lambda: cluster.kill_node(failed),
                observe=lambda s: not down(s).healthy,
            ),
            Phase(
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

        from .._settings import RouterSettings

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
            async with serve(build_app(router)) as base_url:
                self.page_url = f"{base_url}/health/ui"
                self.event(
                    f"notes app serving on {base_url} (routes /notes, /health/nodes); "
                    f"watch routing at {self.page_url}"
                )
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
        request = Request(kind, started, time.monotonic(), node, error)
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

    def _evaluate(self, phase: Phase) -> bool:
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
