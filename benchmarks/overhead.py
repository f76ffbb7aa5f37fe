"""Overhead: hand-written ``get_db`` vs ``router.reader``/``router.writer`` on the same nodes.

Both variants serve the same app module (``benchmarks.app``) with uvicorn, one worker
(uvloop, httptools); reads go to replica-1, writes to the primary, at a fixed
concurrency of 16 connections from ``benchmarks._loadgen`` (client timeout 2 s).

Two cases, the same pool sizes on every engine of both variants (get_db's and each
router node's):

- *roomy*: pool 10 + overflow 10, so 16 connections never wait for a pooled
  connection; reads and writes.
- *contended*: pool 10 + overflow 0, so 6 requests always wait: whether waiters are
  served first come, first served shows in the tail (max, timeouts); reads.

Variants are interleaved in each round, each in a fresh uvicorn process, in an order that
alternates (get_db first in even rounds, router first in odd ones) over an even number
of rounds: whatever drifts on a shared machine during a round (another tenant, the
servers' caches) lands on both variants alike.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ._common import (
    CONCURRENCY,
    LOAD_COLUMNS,
    LOAD_GENERATOR,
    TIMEOUT,
    AppServer,
    CpuMeter,
    LoadResult,
    Table,
    get_db_env,
    load_cells,
    log_dir,
    pool_env,
    postgres_pids,
    ratio,
    read_goal_met,
    router_env,
    run_load,
    spread,
    spread_bar,
)

VARIANTS = ("get_db", "router")
# (case, path): the rows of the table, in order.
CASES = {"roomy": (10, 10), "contended": (10, 0)}
ROWS = (("roomy", "read"), ("contended", "read"), ("roomy", "write"))
COLORS = {"get_db": "tab:blue", "router": "tab:orange"}


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    rounds = 1 if quick else 4
    read_s, write_s, warm_s = (1.5, 1.0, 0.5) if quick else (10, 5, 2)
    replica = cluster.replica_urls[0]
    results: dict[tuple[str, str, str], list[LoadResult]] = {
        (c, p, v): [] for c, p in ROWS for v in VARIANTS
    }
    app_cpu: dict[tuple[str, str, str], list[float]] = {k: [] for k in results}
    pg_cpu: dict[tuple[str, str, str], list[float]] = {k: [] for k in results}
    logs = log_dir(out_dir)
    for number in range(rounds):
        for case, (size, overflow) in CASES.items():
            paths = [p for c, p in ROWS if c == case]
            for variant in VARIANTS if number % 2 == 0 else VARIANTS[::-1]:
                env = (
                    get_db_env(replica, cluster.primary_url)
                    if variant == "get_db"
                    else router_env(cluster.primary_url, [replica])
                )
                env.update(pool_env(size, overflow))
                with AppServer(env, logs) as app:
                    for path in paths:
                        _load(app.base, path, warm_s)
                    for path in paths:
                        meter = CpuMeter({"app": [app.pid], "postgres": postgres_pids(cluster)})
                        meter.start()
                        res = _load(app.base, path, read_s if path == "read" else write_s)
                        cpu = meter.stop()
                        key = (case, path, variant)
                        results[key].append(res)
                        app_cpu[key].append(100 * cpu["app"] / res.seconds)
                        pg_cpu[key].append(1000 * cpu["postgres"] / max(1, res.requests))

    table = Table(
        name="overhead",
        title=(
            f"Overhead: get_db vs router on one replica (reads) / the primary (writes), "
            f"1 uvicorn worker, {CONCURRENCY} connections, {rounds} round(s) interleaved, "
            "order alternated"
        ),
        columns=[
            "case (pool + overflow)",
            "path",
            "variant",
            *LOAD_COLUMNS,
            "uvicorn CPU %",
            "PostgreSQL CPU ms/req",
        ],
    )
    for case, path in ROWS:
        label = f"{case} ({CASES[case][0]} + {CASES[case][1]})"
        for variant in VARIANTS:
            key = (case, path, variant)
            table.rows.append(
                [
                    label,
                    path,
                    variant,
                    *load_cells(results[key]),
                    spread(app_cpu[key], 0),
                    spread(pg_cpu[key], 3),
                ]
            )
        a, b = results[(case, path, "router")], results[(case, path, "get_db")]
        table.rows.append(
            [
                label,
                path,
                "**router / get_db**",
                *(
                    f"{ratio([getattr(r, attr) for r in a], [getattr(r, attr) for r in b]):.3f}"
                    for attr in ("rps", "p50_ms", "p99_ms", "max_ms")
                ),
                "",
                "",
                "",
                "",
            ]
        )
    table.notes += _verdicts(results)
    table.notes.append(
        "Cells are median (min-max) across rounds, errors and timeouts summed over rounds; "
        "ratios are of the medians. errors: non-2xx responses and connection errors; "
        f"timeouts: requests without a response after {TIMEOUT:g} s (the client's timeout: "
        "given up, counted with the time waited in p99 and max). "
        f"Load generator: {LOAD_GENERATOR}; uvicorn with uvloop and httptools; uvicorn "
        "CPU % is of one core (100 = the app process is the bottleneck)."
    )
    table.png = _plot(results, rounds, out_dir / "overhead.png")
    return table


def _load(base: str, path: str, seconds: float) -> LoadResult:
    if path == "read":
        return run_load(base, "/items/", seconds)
    return run_load(base, "/items", seconds, method="POST")


def _verdicts(results: dict[tuple[str, str, str], list[LoadResult]]) -> list[str]:
    def med(case: str, variant: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[(case, "read", variant)]))

    notes = []
    for case in CASES:
        rps = med(case, "router", "rps") / med(case, "get_db", "rps")
        p50 = med(case, "router", "p50_ms") / med(case, "get_db", "p50_ms")
        pairs = list(
            zip(results[(case, "read", "router")], results[(case, "read", "get_db")], strict=True)
        )
        rps_rounds = [ra.rps / rb.rps for ra, rb in pairs]
        p50_rounds = [ra.p50_ms / rb.p50_ms for ra, rb in pairs]
        ok = read_goal_met(rps, p50)
        passed = [read_goal_met(x, y) for x, y in zip(rps_rounds, p50_rounds, strict=True)]
        # A verdict of medians is a coin flip when single rounds land on both sides.
        unsettled = len(set(passed)) > 1
        notes.append(
            f"Read overhead goal, {case} (router within 2% of get_db in req/s and p50): "
            f"{'met' if ok else 'NOT met'}"
            f"{' (not settled: the rounds disagree)' if unsettled else ''}: "
            f"req/s {rps:.3f}x ({(rps - 1) * 100:+.1f}%; per round "
            f"{', '.join(f'{x:.3f}' for x in rps_rounds)}), "
            f"p50 {p50:.3f}x ({(p50 - 1) * 100:+.1f}%; per round "
            f"{', '.join(f'{x:.3f}' for x in p50_rounds)})."
        )
    router = results[("contended", "read", "router")]
    get_db = results[("contended", "read", "get_db")]
    errors = sum(r.errors for r in router)
    timeouts = sum(r.timeouts for r in router)
    p99_r = float(statistics.median(r.p99_ms for r in router))
    p99_g = float(statistics.median(r.p99_ms for r in get_db))
    max_r = max(r.max_ms for r in router)
    max_g = max(r.max_ms for r in get_db)
    checks = [
        (f"no error ({errors})", errors == 0),
        (f"no timeout ({timeouts})", timeouts == 0),
        (f"p99 at or below get_db's ({p99_r:.1f} against {p99_g:.1f} ms)", p99_r <= p99_g),
    ]
    notes.append(
        "Contended case (pool 10 + overflow 0 on every engine, 16 connections, one "
        "replica), router: "
        + "; ".join(f"{text}: {'met' if ok else 'NOT met'}" for text, ok in checks)
        + f". Worst request over all rounds: router {max_r:.0f} ms, get_db {max_g:.0f} ms; "
        f"get_db: {sum(r.errors for r in get_db)} errors, "
        f"{sum(r.timeouts for r in get_db)} timeouts."
    )
    return notes


def _plot(results: dict[tuple[str, str, str], list[LoadResult]], rounds: int, png: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    metrics = (
        ("throughput", "req/s", "rps"),
        ("median latency (p50)", "ms", "p50_ms"),
        ("p99 latency", "ms", "p99_ms"),
        ("max latency (a timeout counts as its wait)", "ms", "max_ms"),
    )
    groups = [f"{case} {path}\n(pool {CASES[case][0]} + {CASES[case][1]})" for case, path in ROWS]
    width = 0.38
    for ax, (title, unit, attr) in zip(axes.flat, metrics, strict=True):
        for i, (case, path) in enumerate(ROWS):
            for j, variant in enumerate(VARIANTS):
                rs = results[(case, path, variant)]
                x = i + (j - 0.5) * width
                spread_bar(
                    ax,
                    x,
                    [getattr(r, attr) for r in rs],
                    width=width,
                    color=COLORS[variant],
                    label=variant if i == 0 else None,
                )
                bad = sum(r.errors for r in rs) + sum(r.timeouts for r in rs)
                if bad:
                    ax.annotate(
                        f"{bad} err/timeout",
                        (x, 0),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="center",
                        fontsize=8,
                        color="red",
                        rotation=90,
                    )
        ax.set_xticks(range(len(ROWS)), groups)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(VARIANTS))
    fig.suptitle(
        f"get_db vs ReplicaRouter, 1 uvicorn worker, {CONCURRENCY} connections, "
        f"{rounds} round(s): bar = median, whisker = min-max over rounds"
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
