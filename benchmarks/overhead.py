"""Overhead: hand-written ``get_db`` vs ``router.reader``/``router.writer`` on the same nodes.

Both variants serve the same app module (``benchmarks.app``) with uvicorn, one worker;
reads go to replica-1, writes to the primary. Variants are interleaved A B A B, each in a
fresh uvicorn process, and load comes from ``wrk`` (or our own load generator) at a fixed
concurrency of 16.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ._common import (
    CONCURRENCY,
    AppServer,
    CpuMeter,
    LoadResult,
    Table,
    get_db_env,
    have_wrk,
    log_dir,
    postgres_pids,
    ratio,
    router_env,
    run_load,
    spread,
)

VARIANTS = ("get_db", "router")
PATHS = ("read", "write")


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    rounds = 1 if quick else 4
    read_s, write_s, warm_s = (2, 1, 1) if quick else (8, 4, 2)
    replica = cluster.replica_urls[0]
    envs = {
        "get_db": get_db_env(replica, cluster.primary_url),
        "router": router_env(cluster.primary_url, [replica]),
    }
    results: dict[tuple[str, str], list[LoadResult]] = {(v, p): [] for v in VARIANTS for p in PATHS}
    app_cpu: dict[tuple[str, str], list[float]] = {(v, p): [] for v in VARIANTS for p in PATHS}
    pg_cpu: dict[tuple[str, str], list[float]] = {(v, p): [] for v in VARIANTS for p in PATHS}
    logs = log_dir(out_dir)
    for _ in range(rounds):
        for variant in VARIANTS:
            with AppServer(envs[variant], logs) as app:
                run_load(app.base, "/items/", warm_s)
                run_load(app.base, "/items", warm_s, method="POST")
                for path, seconds in (("read", read_s), ("write", write_s)):
                    meter = CpuMeter({"app": [app.pid], "postgres": postgres_pids(cluster)})
                    meter.start()
                    if path == "read":
                        res = run_load(app.base, "/items/", seconds)
                    else:
                        res = run_load(app.base, "/items", seconds, method="POST")
                    cpu = meter.stop()
                    results[(variant, path)].append(res)
                    app_cpu[(variant, path)].append(100 * cpu["app"] / res.seconds)
                    pg_cpu[(variant, path)].append(1000 * cpu["postgres"] / max(1, res.requests))

    table = Table(
        name="overhead",
        title=(
            f"Overhead: get_db vs router on one replica (reads) / the primary (writes), "
            f"{CONCURRENCY} connections, {rounds} round(s) interleaved"
        ),
        columns=[
            "path",
            "variant",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "uvicorn CPU %",
            "PostgreSQL CPU ms/req",
        ],
    )
    for path in PATHS:
        for variant in VARIANTS:
            rs = results[(variant, path)]
            table.rows.append(
                [
                    path,
                    variant,
                    spread([r.rps for r in rs], 0),
                    spread([r.p50_ms for r in rs], 2),
                    spread([r.p99_ms for r in rs], 2),
                    str(sum(r.errors for r in rs)),
                    spread(app_cpu[(variant, path)], 0),
                    spread(pg_cpu[(variant, path)], 3),
                ]
            )
    for path in PATHS:
        a, b = results[("router", path)], results[("get_db", path)]
        rps = ratio([r.rps for r in a], [r.rps for r in b])
        p50 = ratio([r.p50_ms for r in a], [r.p50_ms for r in b])
        p99 = ratio([r.p99_ms for r in a], [r.p99_ms for r in b])
        per_round = [ra.p50_ms / rb.p50_ms for ra, rb in zip(a, b, strict=True)]
        table.rows.append(
            [
                path,
                "**router / get_db**",
                f"{rps:.3f}",
                f"{p50:.3f}",
                f"{p99:.3f}",
                "",
                "",
                "",
            ]
        )
        if path == "read":
            p99_spread = [r.p99_ms for r in b]
            noise = (max(p99_spread) - min(p99_spread)) / statistics.median(p99_spread)
            verdict_p50 = "met" if p50 <= 1.02 else "NOT met"
            verdict_p99 = "met" if p99 <= 1.05 else "NOT met"
            table.notes.append(
                f"Goal on reads, router adds at most 2% at p50: {verdict_p50} "
                f"({(p50 - 1) * 100:+.1f}%; per-round p50 ratios "
                f"{', '.join(f'{x:.3f}' for x in per_round)}); at most 5% at p99: "
                f"{verdict_p99} ({(p99 - 1) * 100:+.1f}%, but get_db's own p99 moves by "
                f"{noise * 100:.0f}% between rounds)."
            )
    table.notes.append(
        "Cells are median (min-max) across rounds; ratios are of the medians. "
        f"Load generator: {'wrk, 1 thread' if have_wrk() else 'benchmarks._loadgen'}; "
        "uvicorn CPU % is of one core (100 = the app process is the bottleneck)."
    )
    table.png = _plot(results, out_dir / "overhead.png")
    return table


def _plot(results: dict[tuple[str, str], list[LoadResult]], png: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    metrics = (("req/s", "rps"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"))
    for ax, (label, attr) in zip(axes, metrics, strict=True):
        for i, path in enumerate(PATHS):
            for j, variant in enumerate(VARIANTS):
                values = [getattr(r, attr) for r in results[(variant, path)]]
                med = statistics.median(values)
                ax.bar(
                    i * 3 + j,
                    med,
                    yerr=[[med - min(values)], [max(values) - med]],
                    color="tab:blue" if variant == "get_db" else "tab:orange",
                    label=variant if i == 0 else None,
                    capsize=4,
                )
        ax.set_xticks([0.5, 3.5], list(PATHS))
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle("get_db vs ReplicaRouter (median, min-max bars)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
