"""Strategies: p50/p99 per ``REPLICA_ROUTER_STRATEGY`` with one replica slowed.

Every read calls ``bench_slow(port)``, which sleeps 5 ms only on the replica listening
on that port (replica-1), then reads by primary key. Strategies are interleaved, each
in a fresh uvicorn process, under ``benchmarks._loadgen`` at 16 connections.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ._common import (
    CONCURRENCY,
    LOAD_COLUMNS,
    AppServer,
    LoadResult,
    Table,
    http_get_json,
    load_cells,
    log_dir,
    router_env,
    run_load,
    spread,
    spread_bar,
)

STRATEGIES = ("round_robin", "random", "least_in_flight", "weighted")
SLOW = "replica-1"


def _sessions(base: str) -> dict[str, int]:
    data = http_get_json(base + "/health/nodes")
    return {n["name"]: int(n["sessions"]) for n in data["nodes"]}


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    rounds = 1 if quick else 2
    seconds, warm = (2, 1) if quick else (6, 1)
    slow_port = cluster.node(SLOW).port
    results: dict[str, list[LoadResult]] = {s: [] for s in STRATEGIES}
    slow_share: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    logs = log_dir(out_dir)
    for _ in range(rounds):
        for strategy in STRATEGIES:
            env = router_env(cluster.primary_url, cluster.replica_urls, strategy=strategy)
            env["BENCH_SLOW_PORT"] = str(slow_port)
            with AppServer(env, logs) as app:
                run_load(app.base, "/slow/items/", warm)
                before = _sessions(app.base)
                results[strategy].append(run_load(app.base, "/slow/items/", seconds))
                after = _sessions(app.base)
            delta = {k: after[k] - before[k] for k in after}
            reads = sum(v for k, v in delta.items() if k != "primary") or 1
            slow_share[strategy].append(100 * delta[SLOW] / reads)

    table = Table(
        name="strategies",
        title=(
            f"Strategies with {SLOW} slowed by 5 ms per read, 2 replicas, "
            f"{CONCURRENCY} connections, {rounds} round(s) interleaved"
        ),
        columns=["strategy", *LOAD_COLUMNS, "reads on the slow replica %"],
    )
    for strategy in STRATEGIES:
        rs = results[strategy]
        table.rows.append(
            [
                strategy,
                *load_cells(rs),
                spread(slow_share[strategy], 0),
            ]
        )

    def med(strategy: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[strategy]))

    best_p99 = min(STRATEGIES, key=lambda s: med(s, "p99_ms"))
    best_p50 = min(STRATEGIES, key=lambda s: med(s, "p50_ms"))
    runner_up = sorted(STRATEGIES, key=lambda s: med(s, "p99_ms"))[1]
    best_max = max(r.p99_ms for r in results[best_p99])
    other_min = min(r.p99_ms for r in results[runner_up])
    clear = (
        "one round only, so no spread to compare"
        if rounds == 1
        else ("outside" if best_max < other_min else "within") + " the round-to-round spread"
    )
    table.notes.append(
        f"Best p99: {best_p99} ({med(best_p99, 'p99_ms'):.1f} ms; next {runner_up} "
        f"{med(runner_up, 'p99_ms'):.1f} ms; {clear}). "
        f"Best p50: {best_p50}. Weighted uses equal weights here."
    )
    table.png = _plot(results, out_dir / "strategies.png")
    return table


def _plot(results: dict[str, list[LoadResult]], png: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, attr, label in ((axes[0], "p50_ms", "p50"), (axes[1], "p99_ms", "p99")):
        for i, strategy in enumerate(STRATEGIES):
            spread_bar(ax, i, [getattr(r, attr) for r in results[strategy]])
        ax.set_xticks(range(len(STRATEGIES)), list(STRATEGIES), rotation=15)
        ax.set_title(f"{label} latency")
        ax.set_ylabel("ms")
    fig.suptitle("Read latency per strategy, one replica 5 ms slower (median, min-max)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
