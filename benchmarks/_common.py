"""Shared pieces of the benchmarks: tables, the app server, load generators, CPU accounting."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

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


class AppServer:
    """``uvicorn benchmarks.app:app`` (1 worker) in a subprocess on a free port."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self._log = open(log_dir / f"uvicorn-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=full_env,
            cwd=str(ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited early; see {self._log.name}")
            try:
                http_get_json(self.base + "/ready", timeout=1.0)
                return
            except (OSError, urllib.error.URLError, ValueError):
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"uvicorn did not start; see {self._log.name}") from None
                time.sleep(0.1)

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


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_WRK_LUA = """
local method = os.getenv("BENCH_METHOD") or "GET"
local prefix = os.getenv("BENCH_PATH") or "/items/"
local ids = tonumber(os.getenv("BENCH_IDS") or "1000")
local counter = 0
request = function()
  if method == "POST" then
    return wrk.format("POST", prefix)
  end
  counter = counter + 1
  return wrk.format("GET", prefix .. ((counter * 7919) % ids + 1))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, " ..
    "\\"non2xx\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d}\\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_load(
    base: str,
    path: str,
    seconds: float,
    *,
    method: str = "GET",
    concurrency: int = CONCURRENCY,
    ids: int = 1000,
) -> LoadResult:
    """Closed-loop load at fixed concurrency from another process (wrk, else ours)."""
    if have_wrk():
        return _run_wrk(base, path, seconds, method, concurrency, ids)
    return _run_pyload(base, path, seconds, method, concurrency, ids)


def _run_wrk(
    base: str, path: str, seconds: float, method: str, concurrency: int, ids: int
) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA)
    env = {**os.environ, "BENCH_METHOD": method, "BENCH_PATH": path, "BENCH_IDS": str(ids)}
    try:
        proc = spawn(
            [
                "wrk",
                "-t",
                "1",
                "-c",
                str(concurrency),
                "-d",
                f"{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                base,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=seconds + 60)
        _CHILDREN.discard(proc)
        cpu = 0.0  # wrk is gone by now; its CPU is measured by the caller if needed
    finally:
        os.unlink(script.name)
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line.removeprefix("BENCH_JSON "))
            return LoadResult(
                requests=data["requests"],
                errors=data["errors"] + data["non2xx"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                loadgen_cpu=cpu,
            )
    raise RuntimeError(f"wrk printed no result:\n{text}")


def _run_pyload(
    base: str, path: str, seconds: float, method: str, concurrency: int, ids: int
) -> LoadResult:
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
        )
    lat = [r[1] for r in result["records"] if r[2] < 300 and r[2] > 0]
    return LoadResult(
        requests=len(result["records"]),
        errors=sum(1 for r in result["records"] if not 200 <= r[2] < 300),
        seconds=result["seconds"],
        p50_ms=percentile(lat, 50) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        loadgen_cpu=result["cpu"],
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
) -> subprocess.Popen[bytes]:
    """Start ``benchmarks._loadgen`` in a subprocess; read its JSON with :func:`finish_pyload`."""
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
