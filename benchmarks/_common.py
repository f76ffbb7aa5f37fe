"""Shared pieces of the benchmarks: tables, the app server, load generators, CPU accounting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from ._loadgen import CLIENT_TIMEOUT, CONNECTION_ERROR

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 16

# Every subprocess the benchmarks start, so that Ctrl-C or an error never leaves one behind.
_CHILDREN: set[subprocess.Popen[bytes]] = set()


@dataclass
class Table:
    """One benchmark's result: a markdown table plus notes, and the PNG it plotted."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    png: Path | None = None

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        if self.png is not None:
            lines += ["", f"![{self.name}]({self.png.name})"]
        return "\n".join(lines) + "\n"


# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``median (min-max)`` of several rounds, or the one value."""
    if not values:
        return "n/a"
    fmt = f"{{:.{digits}f}}"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of a over median of b."""
    return statistics.median(a) / statistics.median(b)


# -- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(
    args: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group and remember it for :func:`kill_children`."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        list(args), env=dict(env) if env is not None else None, start_new_session=True, **kw
    )
    _CHILDREN.add(proc)
    return proc


def terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _CHILDREN.discard(proc)


def kill_children() -> None:
    for proc in list(_CHILDREN):
        terminate(proc, grace=2.0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


class CpuMeter:
    """CPU seconds spent by groups of process trees between ``start()`` and ``stop()``.

    Short-lived processes (a backend per connection) are counted while they live:
    benchmarks use pooled connections, so backends live through a measurement.
    """

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self._groups = groups
        self._before: dict[str, dict[int, float]] = {}
        self.seconds: dict[str, float] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        return {
            name: {pid: cpu_seconds(pid) for root in roots for pid in process_tree(root)}
            for name, roots in self._groups.items()
        }

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        self.seconds = {
            name: sum(max(0.0, t - self._before[name].get(pid, 0.0)) for pid, t in pids.items())
            for name, pids in after.items()
        }
        return self.seconds


# -- the app under test -----------------------------------------------------------------


def http_get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(
    base: str, proc: subprocess.Popen[bytes], seconds: float, *, poll_timeout: float = 1.0
) -> bool:
    """Until ``base/ready`` answers: True, or False once ``proc`` exited or ``seconds``
    passed."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            http_get_json(base + "/ready", timeout=poll_timeout)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def uvicorn_args(port: int) -> list[str]:
    """``-m uvicorn ...`` serving ``benchmarks.app`` on ``port`` as production does:
    uvloop and httptools, no access log."""
    return [
        "-m",
        "uvicorn",
        "benchmarks.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


class AppServer:
    """``uvicorn benchmarks.app:app`` in a subprocess on a free port.

    Every variant runs as production does: uvloop and httptools, no access log; with
    ``workers`` > 1, uvicorn's supervisor forks the workers (:class:`CpuMeter` counts
    the whole process tree).
    """

    def __init__(self, env: Mapping[str, str], log_dir: Path, *, workers: int = 1) -> None:
        self.port = free_port()
        self.workers = workers
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self._log = open(log_dir / f"uvicorn-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = spawn(
            [sys.executable, *uvicorn_args(self.port), "--workers", str(workers)],
            env=full_env,
            cwd=str(ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        if not wait_ready(self.base, self.proc, 30):
            self.close()
            raise RuntimeError(f"uvicorn did not start; see {self._log.name}")
        if workers > 1:
            self._wait_for_workers(deadline)

    def _wait_for_workers(self, deadline: float) -> None:
        """Until every worker answers: load that starts earlier puts all its keep-alive
        connections on the first worker up."""
        pids: set[int] = set()
        while len(pids) < self.workers:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                pids.add(int(http_get_json(self.base + "/ready", timeout=1.0)["pid"]))
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"uvicorn workers did not all start; see {self._log.name}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        terminate(self.proc, grace=10.0)
        self._log.close()

    def __enter__(self) -> AppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- load -------------------------------------------------------------------------------

# The load generator's client timeout: a request without its response by then is given
# up and counted as a timeout (what a client with a 2 s timeout would see).
TIMEOUT = 2.0
LOAD_COLUMNS = ["req/s", "p50 ms", "p99 ms", "max ms", "errors", "timeouts"]
LOAD_GENERATOR = "benchmarks._loadgen (uvloop, one process)"


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One closed-loop run, from the load generator's record of every request.

    ``errors``: non-2xx responses (5xx in practice) and connection errors;
    ``timeouts``: requests given up at the client timeout. Latency percentiles and
    the max are over every request but connection errors, a timeout counting with
    the time it waited; ``rps`` counts 2xx responses.
    """

    requests: int
    ok: int
    errors: int
    timeouts: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    loadgen_cpu: float = 0.0
    mean_ms: float = float("nan")
    connections_per_worker: tuple[int, ...] = ()

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @classmethod
    def from_records(
        cls,
        records: Sequence[Sequence[Any]],
        seconds: float,
        cpu: float = 0.0,
        connections_per_worker: Sequence[int] = (),
    ) -> LoadResult:
        """From ``benchmarks._loadgen`` records ``[start, latency, status, ...]``."""
        ok = sum(1 for r in records if 200 <= r[2] < 300)
        timeouts = sum(1 for r in records if r[2] == CLIENT_TIMEOUT)
        lat = [r[1] * 1000 for r in records if r[2] != CONNECTION_ERROR]
        return cls(
            requests=len(records),
            ok=ok,
            errors=len(records) - ok - timeouts,
            timeouts=timeouts,
            seconds=seconds,
            p50_ms=percentile(lat, 50),
            p99_ms=percentile(lat, 99),
            max_ms=max(lat, default=float("nan")),
            loadgen_cpu=cpu,
            mean_ms=sum(lat) / len(lat) if lat else float("nan"),
            connections_per_worker=tuple(connections_per_worker),
        )


def load_cells(results: Sequence[LoadResult]) -> list[str]:
    """The :data:`LOAD_COLUMNS` cells of several rounds: median (min-max), counts summed."""
    return [
        spread([r.rps for r in results], 0),
        spread([r.p50_ms for r in results], 2),
        spread([r.p99_ms for r in results], 2),
        spread([r.max_ms for r in results], 1),
        str(sum(r.errors for r in results)),
        str(sum(r.timeouts for r in results)),
    ]


def run_load(
    base: str,
    path: str,
    seconds: float,
    *,
    method: str = "GET",
    concurrency: int = CONCURRENCY,
    ids: int = 1000,
    timeout: float = TIMEOUT,
    workers: int = 1,
) -> LoadResult:
    """Closed-loop load at fixed concurrency from another process (``benchmarks._loadgen``).

    Not wrk, though it costs less CPU per request: wrk drops from its latency
    histogram every response slower than its ``--timeout`` (so its max never exceeds
    it) and counts timeouts by sampling open connections every 2 s, so a connection
    starved for the whole run may never show. Our generator records every request.
    With ``workers`` > 1, the connections are spread evenly over the server's workers.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        result = pyload(
            base,
            out,
            seconds=seconds,
            concurrency=concurrency,
            mode="write" if method == "POST" else "read",
            read_paths=[path],
            write_path=path,
            ids=ids,
            timeout=timeout,
            tag=uuid.uuid4().hex[:12],  # the keys of POSTs are unique across runs
            workers=workers,
        )
    return LoadResult.from_records(
        result["records"],
        result["seconds"],
        result["cpu"],
        result.get("connections_per_worker", ()),
    )


def start_pyload(
    base: str,
    out: Path,
    *,
    seconds: float,
    concurrency: int,
    mode: str = "read",
    read_paths: Sequence[str] = ("/items/",),
    write_path: str = "/items",
    ids: int = 1000,
    tag: str = "w",
    timeout: float | None = None,
    workers: int = 1,
) -> subprocess.Popen[bytes]:
    """Start ``benchmarks._loadgen`` in a subprocess; read its JSON with :func:`finish_pyload`.

    ``timeout``: the client timeout per request (the generator's default if None);
    ``workers``: how many server processes to spread the connections over.
    """
    args = [
        sys.executable,
        "-m",
        "benchmarks._loadgen",
        "--base",
        base,
        "--out",
        str(out),
        "--seconds",
        str(seconds),
        "--concurrency",
        str(concurrency),
        "--mode",
        mode,
        "--write-path",
        write_path,
        "--ids",
        str(ids),
        "--tag",
        tag,
    ]
    if timeout is not None:
        args += ["--timeout", str(timeout)]
    if workers > 1:
        args += ["--workers", str(workers)]
    for p in read_paths:
        args += ["--read-path", p]
    return spawn(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


def finish_pyload(proc: subprocess.Popen[bytes], out: Path, timeout: float) -> dict[str, Any]:
    proc.wait(timeout=timeout)
    _CHILDREN.discard(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed with status {proc.returncode}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def pyload(base: str, out: Path, *, seconds: float, **kw: Any) -> dict[str, Any]:
    return finish_pyload(start_pyload(base, out, seconds=seconds, **kw), out, seconds + 60)


# -- plots ------------------------------------------------------------------------------


def spread_bar(ax: Any, x: float, values: Sequence[float], **kw: Any) -> None:
    """A bar at the median of ``values`` with a min-max error bar."""
    med = statistics.median(values)
    ax.bar(x, med, yerr=[[med - min(values)], [max(values) - med]], capsize=4, **kw)


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that ``finally`` blocks clean up."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- environments of the app variants ---------------------------------------------------


def read_goal_met(rps: float, p50: float) -> bool:
    """The read overhead goal: router / get_db req/s at least 0.98, p50 at most 1.02."""
    return rps >= 0.98 and p50 <= 1.02


def get_db_env(read_url: str, write_url: str) -> dict[str, str]:
    return {"BENCH_VARIANT": "get_db", "BENCH_READ_URL": read_url, "BENCH_WRITE_URL": write_url}


def router_env(primary_url: str, replica_urls: Sequence[str], **settings: object) -> dict[str, str]:
    env = {
        "BENCH_VARIANT": "router",
        "REPLICA_ROUTER_PRIMARY_URL": primary_url,
        "REPLICA_ROUTER_REPLICA_URLS": ",".join(replica_urls),
    }
    for key, value in settings.items():
        env[f"REPLICA_ROUTER_{key.upper()}"] = str(value)
    return env


def pool_env(pool_size: int, max_overflow: int) -> dict[str, str]:
    """The same pool for both variants: get_db's engines and every router node."""
    return {
        "BENCH_POOL_SIZE": str(pool_size),
        "BENCH_MAX_OVERFLOW": str(max_overflow),
        "REPLICA_ROUTER_POOL_SIZE": str(pool_size),
        "REPLICA_ROUTER_MAX_OVERFLOW": str(max_overflow),
    }


def log_dir(out_dir: Path) -> Path:
    path = out_dir / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def postgres_pids(cluster: Any) -> list[int]:
    return [node.pid for node in cluster.nodes if node.pid is not None]


def stop_pyload(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    """End a load generator started with a long duration, and read its records."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR1)
    return finish_pyload(proc, out, timeout=30)
