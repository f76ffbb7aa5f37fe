"""Drivers: psycopg 3 against asyncpg on the read path, router and ``get_db`` each.

The same app (``benchmarks.app``), one uvicorn worker (uvloop, httptools), reads of
replica-1 at 16 connections, pool 10 + overflow 10; the URLs name ``postgresql+asyncpg``
or ``postgresql+psycopg``. Four variants, interleaved in each round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ._common import (
    CONCURRENCY,
    LOAD_COLUMNS,
    AppServer,
    CpuMeter,
    LoadResult,
    Table,
    get_db_env,
    load_cells,
    log_dir,
    pool_env,
    ratio,
    router_env,
    run_load,
    spread,
    spread_bar,
)

DRIVERS = ("asyncpg", "psycopg")
VARIANTS = ("get_db", "router")


def _url(url: str, driver: str) -> str:
    return url.replace("postgresql+asyncpg", f"postgresql+{driver}", 1)


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    rounds = 1 if quick else 3
    seconds, warm = (1.5, 0.5) if quick else (8, 2)
    keys = [(d, v) for d in DRIVERS for v in VARIANTS]
    results: dict[tuple[str, str], list[LoadResult]] = {k: [] for k in keys}
    app_cpu: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    logs = log_dir(out_dir)
    for _ in range(rounds):
        for driver, variant in keys:
            replica, primary = (
                _url(u, driver) for u in (cluster.replica_urls[0], cluster.primary_url)
            )
            env = (
                get_db_env(replica, primary)
                if variant == "get_db"
                else router_env(primary, [replica])
            )
            env.update(pool_env(10, 10))
            with AppServer(env, logs) as app:
                run_load(app.base, "/items/", warm)
                meter = CpuMeter({"app": [app.pid]})
                meter.start()
                res = run_load(app.base, "/items/", seconds)
                cpu = meter.stop()
                results[(driver, variant)].append(res)
                app_cpu[(driver, variant)].append(1000 * cpu["app"] / max(1, res.requests))
    table = Table(
        name="drivers",
        title=(
            f"Drivers: psycopg 3 vs asyncpg on the read path, 1 uvicorn worker, "
            f"{CONCURRENCY} connections, {rounds} round(s) interleaved"
        ),
        columns=["driver", "variant", *LOAD_COLUMNS, "uvicorn CPU ms/req"],
    )
    for driver in DRIVERS:
        for variant in VARIANTS:
            key = (driver, variant)
            table.rows.append([driver, variant, *load_cells(results[key]), spread(app_cpu[key], 3)])
        a, b = results[(driver, "router")], results[(driver, "get_db")]
        table.rows.append(
            [
                driver,
                "**router / get_db**",
                *(
                    f"{ratio([getattr(r, m) for r in a], [getattr(r, m) for r in b]):.3f}"
                    for m in ("rps", "p50_ms", "p99_ms", "max_ms")
                ),
                "",
                "",
                "",
            ]
        )
    for variant in VARIANTS:
        a, b = results[("psycopg", variant)], results[("asyncpg", variant)]
        table.notes.append(
            f"{variant}: psycopg / asyncpg req/s "
            f"{ratio([r.rps for r in a], [r.rps for r in b]):.3f}, p50 "
            f"{ratio([r.p50_ms for r in a], [r.p50_ms for r in b]):.3f}."
        )
    table.notes.append(
        "Cells are median (min-max) across rounds; ratios are of the medians. "
        "uvicorn CPU ms/req: the app process's CPU time per request."
    )
    table.png = _plot(results, out_dir / "drivers.png")
    return table


def _plot(results: dict[tuple[str, str], list[LoadResult]], png: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (label, unit, attr) in zip(
        axes, (("throughput", "req/s", "rps"), ("p50 latency", "ms", "p50_ms")), strict=True
    ):
        for i, driver in enumerate(DRIVERS):
            for j, variant in enumerate(VARIANTS):
                values = [getattr(r, attr) for r in results[(driver, variant)]]
                spread_bar(
                    ax,
                    i * 3 + j,
                    values,
                    color="tab:blue" if variant == "get_db" else "tab:orange",
                    label=variant if i == 0 else None,
                )
        ax.set_xticks([0.5, 3.5], list(DRIVERS))
        ax.set_title(label)
        ax.set_ylabel(unit)
    axes[0].legend()
    fig.suptitle("Read path by driver (median, min-max bars)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
