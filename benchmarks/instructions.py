"""What a request costs, in CPU instructions: ``get_db`` against the router, counted by
valgrind's callgrind in the uvicorn process.

Timings on a shared machine move by a quarter between rounds; an instruction count
moves by 1-2% between runs, so it shows a change of the read path's cost that no
timing here can. Each variant serves ``benchmarks.app`` under
``valgrind --tool=callgrind`` (uvloop, httptools, pool 10 + 10, one replica for reads,
the primary for writes), one connection at a time so that every request does the same
work, and once with 16 connections on pools of 10 + 0 (the contended case). The counters
are zeroed after a warm-up and dumped after a load window, and the instructions of the
whole process (Python, the event loop, the drivers) are divided by the requests served.
Health probes run once an hour here: a probe is a cost per interval, not per request,
and under valgrind's slowdown a second's probe would be charged to a handful of
requests. Needs valgrind (``apt-get install valgrind``).

    python -m benchmarks --only instructions
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import (
    ROOT,
    LoadResult,
    Table,
    free_port,
    get_db_env,
    pool_env,
    router_env,
    run_load,
    spawn,
    terminate,
    uvicorn_args,
    wait_ready,
)

VARIANTS = ("get_db", "router")


@dataclass(frozen=True)
class _Case:
    """One row: what is asked, how many at a time, the pools, the router's settings."""

    name: str
    method: str
    path: str
    concurrency: int = 1
    pool: tuple[int, int] = (10, 10)
    router: tuple[tuple[str, str], ...] = ()

    @property
    def load(self) -> tuple[str, str, int, tuple[int, int]]:
        """What ``get_db`` serves: cases that differ only in the router's settings share it."""
        return self.method, self.path, self.concurrency, self.pool


CASES = (
    _Case("read", "GET", "/items/"),
    # The case: more requests than connections, so every checkout waits its
    # turn in the router's fair pool (SQLAlchemy's lets a returning request go first).
    _Case("read, 16 conns, pool 10 + 0", "GET", "/items/", concurrency=16, pool=(10, 0)),
    _Case("write", "POST", "/items"),
    # What the write's one more round trip (the commit's WAL position) costs.
    _Case(
        "write, read-your-writes off",
        "POST",
        "/items",
        router=(("REPLICA_ROUTER_READ_YOUR_WRITES", "off"),),
    ),
)
_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    table = Table(
        name="instructions",
        title="Instructions per request (callgrind, the uvicorn process)",
        columns=["case", "`get_db`", "`router`", "router / get_db", "requests counted"],
    )
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        table.notes.append("Skipped: valgrind is not installed (apt-get install valgrind).")
        return table
    seconds, warm = (3.0, 2.0) if quick else (40.0, 8.0)
    cases = CASES[:1] if quick else CASES
    get_db: dict[tuple[str, str, int, tuple[int, int]], tuple[float, int]] = {}
    counted: dict[str, tuple[tuple[float, int], tuple[float, int]]] = {}
    for case in cases:
        if case.load not in get_db:
            env = get_db_env(cluster.replica_urls[0], cluster.primary_url)
            env.update(pool_env(*case.pool))
            get_db[case.load] = _count(env, case, seconds, warm)
        env = router_env(cluster.primary_url, cluster.replica_urls[:1], health_interval=3600)
        env.update(pool_env(*case.pool))
        env.update(case.router)
        counted[case.name] = (get_db[case.load], _count(env, case, seconds, warm))
    for name, ((a, n_a), (b, n_b)) in counted.items():
        table.rows.append(
            [name, f"{a / 1000:,.1f}k", f"{b / 1000:,.1f}k", f"{b / a:.3f}", f"{n_a} / {n_b}"]
        )
    table.notes.append(
        f"{seconds:g} s per variant after {warm:g} s of warm-up; one connection and pool "
        "10 + 10 unless the case says otherwise; defaults otherwise (read-your-writes "
        "`lsn`, the middleware installed). get_db's write commits in the endpoint, the "
        "router's writer after it and then reads the commit's WAL position (one more "
        "round trip); the last row turns that off for the router only. A run's count "
        "moves by 1-2%."
    )
    for name, bound in (("read", 1.02), ("write", 1.05)):
        if name in counted:
            (a, _), (b, _) = counted[name]
            table.notes.append(
                f"Goal, {name} (the router within {(bound - 1) * 100:.0f}% of get_db), by "
                f"count: {'met' if b / a <= bound else 'NOT met'} ({(b / a - 1) * 100:+.1f}%)."
            )
    table.notes.append(
        "A count leaves out the kernel's share (system calls, page faults, context "
        "switches), which the timed benchmarks include."
    )
    table.png = _plot(counted, out_dir / "instructions.png")
    return table


def _count(env: dict[str, str], case: _Case, seconds: float, warm: float) -> tuple[float, int]:
    """Instructions per request of one variant, and the requests they were counted over."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = spawn(
            [
                "valgrind",
                "--tool=callgrind",
                # Uninstrumented until the warm-up is over: starting Python fully
                # instrumented takes a minute.
                "--instr-atstart=no",
                f"--callgrind-out-file={tmp}/callgrind.%p",
                sys.executable,
                *uvicorn_args(port),
            ],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            # Python starts several times slower under valgrind.
            if not wait_ready(base, proc, 180, poll_timeout=5.0):
                raise RuntimeError("the app did not start under valgrind")
            _load(base, case, warm)
            _control("-i", proc.pid, "on")
            _load(base, case, 1.0)  # the code is instrumented anew
            _control("-z", proc.pid)  # zero the counters: only the window counts
            result = _load(base, case, seconds)
            _control("-d", proc.pid)
            total = _totals(Path(tmp), proc.pid)
        finally:
            terminate(proc, grace=30.0)
    return total / max(1, result.ok), result.ok


def _load(base: str, case: _Case, seconds: float) -> LoadResult:
    return run_load(
        base, case.path, seconds, method=case.method, concurrency=case.concurrency, timeout=30.0
    )


def _control(flag: str, pid: int, *value: str) -> None:
    subprocess.run(["callgrind_control", flag, *value, str(pid)], check=True, capture_output=True)


def _totals(folder: Path, pid: int) -> int:
    """The instruction total of the newest dump of ``pid`` (the window's)."""
    deadline = time.monotonic() + 30
    while True:
        dumps = sorted(folder.glob(f"callgrind.{pid}*"), key=lambda p: p.stat().st_mtime)
        for dump in reversed(dumps):
            found = _TOTALS.search(dump.read_text(errors="replace"))
            if found and dump.name != f"callgrind.{pid}":  # the dump, not the final file
                return int(found.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError("callgrind wrote no dump")
        time.sleep(0.2)


def _plot(counted: dict[str, tuple[tuple[float, int], tuple[float, int]]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(counted)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for i, variant in enumerate(VARIANTS):
        xs = [x + (i - 0.5) * width for x in range(len(names))]
        values = [counted[name][i][0] / 1000 for name in names]
        bars = ax.bar(xs, values, width, label=variant)
        ax.bar_label(bars, fmt="%.0fk", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace(", ", ",\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("thousand instructions per request")
    ax.set_title("callgrind: instructions per request of the uvicorn process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
