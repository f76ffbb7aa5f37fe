"""Where a read's work goes, counted rather than timed: Python calls per request by
layer (cProfile), and page faults and greenlets per request, ``get_db`` against the
router on the same route.

Timings on a shared machine move by tens of percent between rounds; these counts do
not, so they show what a change to the read path costs before any timing can. Each
variant serves ``benchmarks.app`` in a uvicorn process of its own (uvloop, httptools,
pool 10 + 10, one replica). Page faults are read from ``/proc`` over a load window
without the profiler; then cProfile runs over a second window. A greenlet (one per
SQLAlchemy ``greenlet_spawn``) maps a fresh frame stack for Python: the minor fault per
greenlet is the most expensive thing here that a call count does not show (about 10 us
with its two system calls on this machine).

    python -m benchmarks --only profile
"""

from __future__ import annotations

import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ._common import (
    ROOT,
    Table,
    free_port,
    get_db_env,
    pool_env,
    router_env,
    run_load,
    spawn,
    terminate,
    wait_ready,
)

VARIANTS = ("get_db", "router")
# Layer by where the function is defined; the first match wins.
LAYERS = (
    ("replica_router", "/replica_router/"),
    ("SQLAlchemy", "/sqlalchemy/"),
    ("asyncpg", "/asyncpg/"),
    ("FastAPI, Starlette", ("/fastapi/", "/starlette/")),
    ("uvicorn", "/uvicorn/"),
    ("benchmark app", "/benchmarks/"),
    ("Python standard library", "/lib/python3"),
    ("built-ins (C)", "~"),
)


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    seconds = 1.5 if quick else 6.0
    replica = cluster.replica_urls[0]
    found: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        env = (
            get_db_env(replica, cluster.primary_url)
            if variant == "get_db"
            else router_env(cluster.primary_url, [replica])
        )
        env.update(pool_env(10, 10))
        found[variant] = _measure(env, seconds)
    table = Table(
        name="profile",
        title="Where a read's work goes: counts per request of `GET /items/{id}`",
        columns=["per request", "`get_db`", "`router.reader`", "difference"],
    )
    keys = ["calls", *(name for name, _ in LAYERS), "greenlets", "minor page faults"]
    for key in keys:
        a, b = found["get_db"].get(key, 0.0), found["router"].get(key, 0.0)
        label = (
            f"Python calls: {key}"
            if key not in ("calls", "greenlets", "minor page faults")
            else key
        )
        if key == "calls":
            label = "Python calls, all"
        table.rows.append([label, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}"])
    table.notes.append(
        "Counted over a load window of "
        f"{seconds:g} s per variant (16 connections); calls by cProfile (a generator's or "
        "coroutine's every resumption counts), faults from /proc without the profiler."
    )
    own = sorted(
        ((v, k[3:]) for k, v in found["router"].items() if k.startswith("fn ")), reverse=True
    )
    table.notes.append(
        "The router's own calls per request: "
        + ", ".join(f"`{name}` {value:.1f}" for value, name in own if value >= 0.5)
        + "."
    )
    table.png = _plot(found, out_dir / "profile.png")
    return table


def _measure(env: dict[str, str], seconds: float) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = out = Path(tmp) / "stats"
        proc = spawn(
            [sys.executable, "-m", "benchmarks._profserve", str(port)],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT), "BENCH_PROFILE_OUT": str(out)},
            cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(base, proc, 30):
                raise RuntimeError("the profiled app did not start")
            run_load(base, "/items/", 1.0)  # warm: pools filled, statements cached
            faults = _minor_faults(proc.pid)
            plain = run_load(base, "/items/", seconds)
            faults = _minor_faults(proc.pid) - faults
            proc.send_signal(signal.SIGUSR1)
            profiled = run_load(base, "/items/", seconds)
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not stats_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # the dump finishes writing
            stats = pstats.Stats(str(stats_file))
        finally:
            terminate(proc)
    counts = _layers(stats)
    result = {key: value / max(1, profiled.requests) for key, value in counts.items()}
    result["minor page faults"] = faults / max(1, plain.requests)
    return result


def _minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def _layers(stats: pstats.Stats) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (filename, _, name), entry in stats.stats.items():  # type: ignore[attr-defined]
        calls = entry[1]
        counts["calls"] += calls
        if name == "__init__" and filename.endswith(os.path.join("util", "concurrency.py")):
            counts["greenlets"] += calls  # SQLAlchemy's greenlet, one per greenlet_spawn
        for layer, where in LAYERS:
            if any(w in filename for w in ((where,) if isinstance(where, str) else where)):
                counts[layer] += calls
                if layer == "replica_router":
                    counts[f"fn {Path(filename).stem}.{name}"] += calls
                break
    return counts


def _plot(found: dict[str, dict[str, float]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [name for name, _ in LAYERS]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.4
    for i, variant in enumerate(VARIANTS):
        xs = [x + (i - 0.5) * width for x in range(len(layers))]
        ax.bar(xs, [found[variant].get(layer, 0.0) for layer in layers], width, label=variant)
    ax.set_xticks(range(len(layers)), layers, rotation=25, ha="right")
    ax.set_ylabel("Python calls per request")
    ax.set_title("GET /items/{id}: Python calls per request by layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
