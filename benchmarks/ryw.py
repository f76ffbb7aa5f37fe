"""Read-your-writes (issue #5): replica share, stale reads and read latency per mode.

Both replicas apply WAL 50 ms late (``recovery_min_apply_delay``, reset afterwards).
16 virtual clients (``benchmarks._rywload``, each its own cookie jar, 20 ms think
time) write 20% of the time and otherwise read the row they wrote last; a read that
does not find it is stale. Modes: ``REPLICA_ROUTER_READ_YOUR_WRITES`` = off,
request, lsn, and ``pin_2s``: what Rails does, the primary for 2 s after a client's
write (a cookie with the time of the write; ``benchmarks.app`` with
``BENCH_PIN_SECONDS=2``, router mode off).
Variants are interleaved, each in a fresh uvicorn process.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ._common import (
    CONCURRENCY,
    ROOT,
    AppServer,
    CpuMeter,
    Table,
    finish_pyload,
    http_get_json,
    log_dir,
    percentile,
    router_env,
    spawn,
    spread,
)

VARIANTS = ("off", "request", "lsn", "pin_2s")
APPLY_DELAY = "50ms"
WRITE_SHARE = 0.2
PIN_SECONDS = 2
THINK = 0.02  # seconds between a response and the client's next request, on average
COLORS = {"off": "tab:gray", "request": "tab:blue", "lsn": "tab:green", "pin_2s": "tab:red"}


class _Run:
    """One variant's measured run: the client's records and the router's decisions."""

    def __init__(self, data: dict[str, Any], decisions: dict[str, int], app_cpu: float) -> None:
        ok = [r for r in data["reads"] if r[2] == 200]
        own = [r for r in ok if r[3]]
        stale = [r for r in own if not r[4]]
        self.seconds: float = data["seconds"]
        self.reads = len(ok)
        self.errors = len(data["reads"]) - len(ok) + sum(1 for w in data["writes"] if w[2] != 200)
        self.writes = sum(1 for w in data["writes"] if w[2] == 200)
        self.on_replica = sum(r[5] for r in ok)
        self.own_reads = len(own)
        self.stale = len(stale)
        # When stale reads stop: at most the apply delay after the write, if it works.
        self.stale_max_ms = max((r[6] * 1000 for r in stale), default=0.0)
        latencies = [r[1] * 1000 for r in ok]
        self.p50_ms = percentile(latencies, 50)
        self.p99_ms = percentile(latencies, 99)
        self.decisions = decisions
        self.app_cpu = app_cpu

    @property
    def replica_pct(self) -> float:
        return 100 * self.on_replica / self.reads if self.reads else float("nan")

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.seconds if self.seconds else 0.0


def _env(cluster: Any, variant: str) -> dict[str, str]:
    mode = "off" if variant == "pin_2s" else variant
    env = router_env(cluster.primary_url, cluster.replica_urls, read_your_writes=mode)
    if variant == "pin_2s":
        env["BENCH_PIN_SECONDS"] = str(PIN_SECONDS)
    return env


def _set_apply_delay(cluster: Any, value: str | None) -> None:
    """``recovery_min_apply_delay`` on every replica (``None`` resets it); a reload."""
    for node in cluster.replicas:
        if value is None:
            cluster.execute(node, "ALTER SYSTEM RESET recovery_min_apply_delay")
        else:
            cluster.execute(node, f"ALTER SYSTEM SET recovery_min_apply_delay = '{value}'")
        cluster.execute(node, "SELECT pg_reload_conf()")
    want = value or "0"
    deadline = time.monotonic() + 10
    for node in cluster.replicas:  # the reload is asynchronous
        while cluster.execute(node, "SHOW recovery_min_apply_delay")[0][0] != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}: recovery_min_apply_delay is not {want}")
            time.sleep(0.05)


def _load(base: str, out: Path, seconds: float, seed: int) -> dict[str, Any]:
    proc = spawn(
        [
            sys.executable,
            "-m",
            "benchmarks._rywload",
            "--base",
            base,
            "--out",
            str(out),
            "--seconds",
            str(seconds),
            "--clients",
            str(CONCURRENCY),
            "--write-share",
            str(WRITE_SHARE),
            "--seed",
            str(seed),
            "--think",
            str(THINK),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
    )
    return finish_pyload(proc, out, seconds + 60)


def _counters(base: str) -> dict[str, int]:
    """The router's read decisions (summed over its read policies) and sessions per node."""
    status = http_get_json(base + "/health/nodes")
    counters = {f"sessions:{n['name']}": int(n["sessions"]) for n in status["nodes"]}
    for policy in status["reads"]:
        for name, count in policy["decisions"].items():
            counters[name] = counters.get(name, 0) + int(count)
    return counters


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    rounds = 1 if quick else 3
    seconds, warm = (2, 1) if quick else (8, 2)
    runs: dict[str, list[_Run]] = {v: [] for v in VARIANTS}
    logs = log_dir(out_dir)
    load_out = logs / "ryw-load.json"
    _set_apply_delay(cluster, APPLY_DELAY)
    try:
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                with AppServer(_env(cluster, variant), logs) as app:
                    _load(app.base, load_out, warm, seed=1000 + r)
                    before = _counters(app.base)
                    meter = CpuMeter({"app": [app.pid]})
                    meter.start()
                    data = _load(app.base, load_out, seconds, seed=r)
                    app_cpu = 100 * meter.stop()["app"] / data["seconds"]
                    after = _counters(app.base)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                runs[variant].append(_Run(data, delta, app_cpu))
    finally:
        _set_apply_delay(cluster, None)
        cluster.wait_for_replay()
        load_out.unlink(missing_ok=True)

    table = Table(
        name="ryw",
        title=(
            f"Read-your-writes with replicas {APPLY_DELAY} behind "
            f"(recovery_min_apply_delay), {int(WRITE_SHARE * 100)}% writes, "
            f"{CONCURRENCY} clients, 2 replicas, {rounds} round(s) interleaved"
        ),
        columns=[
            "mode",
            "reads",
            "reads on replicas %",
            "stale reads (of reads of own write)",
            "read p50 ms",
            "read p99 ms",
            "added p50 / p99 ms vs off",
            "writes/s",
            "errors",
        ],
    )

    def med(variant: str, attr: str) -> float:
        return float(statistics.median(getattr(x, attr) for x in runs[variant]))

    for variant in VARIANTS:
        rs = runs[variant]
        added = (
            ""
            if variant == "off"
            else f"{med(variant, 'p50_ms') - med('off', 'p50_ms'):+.1f} / "
            f"{med(variant, 'p99_ms') - med('off', 'p99_ms'):+.1f}"
        )
        table.rows.append(
            [
                variant,
                str(sum(x.reads for x in rs)),
                spread([x.replica_pct for x in rs], 1),
                f"{sum(x.stale for x in rs)} of {sum(x.own_reads for x in rs)}",
                spread([x.p50_ms for x in rs], 1),
                spread([x.p99_ms for x in rs], 1),
                added,
                spread([x.writes_per_s for x in rs], 0),
                str(sum(x.errors for x in rs)),
            ]
        )

    lsn = runs["lsn"]
    share = 100 * sum(x.on_replica for x in lsn) / max(1, sum(x.reads for x in lsn))
    stale = sum(x.stale for x in lsn)
    verdict = "met" if share >= 90 and stale == 0 else "NOT met"
    table.notes.append(
        f"Goal, lsn keeps at least 90% of reads on replicas with no stale read: {verdict} "
        f"({share:.1f}% of all lsn reads on replicas, {stale} stale)."
    )
    for variant in VARIANTS:
        table.notes.append(f"Router decisions, {variant}: {_summary(runs[variant])}.")
    since = [x.stale_max_ms for rs in runs.values() for x in rs]
    table.notes.append(
        "Each client reads the row it wrote last (a random seeded row before its first "
        f"write) {THINK * 1000:.0f} ms (on average, uniform 0.5-1.5x) after the response "
        f"to its previous request, so many reads follow a write by less than the "
        f"{APPLY_DELAY} delay; 'stale' counts reads of the client's own last "
        "write that did not find it (the latest of them came "
        f"{max(since):.0f} ms after the write's response: the delay is in effect). "
        "Reads on replicas are counted by the client, from pg_is_in_recovery() of the "
        "server that answered. Latency is of every successful read as the client saw "
        "it; 'added' is the difference of the medians to off. Router settings otherwise "
        "default: consistency_wait 0.25 s, round_robin, health_interval 1 s. pin_2s "
        "reads through router.primary.reader_sessionmaker while its cookie is under 2 s "
        "old, so the router's counters do not see those reads."
    )
    cpu = ", ".join(f"{v} {spread([x.app_cpu for x in runs[v]], 0)}" for v in VARIANTS)
    table.notes.append(
        "Cells are median (min-max) across rounds; reads, stale reads and errors are sums. "
        "Load generator: benchmarks._rywload (one keep-alive connection and cookie jar "
        "per virtual client, closed loop with think time, in its own process). "
        f"uvicorn CPU % of one core: {cpu}."
    )
    table.png = _plot(runs, out_dir / "ryw.png")
    return table


def _summary(rs: Sequence[_Run]) -> str:
    """Decisions as shares of all counted reads, then sessions per node."""
    total: dict[str, int] = {}
    for x in rs:
        for name, count in x.decisions.items():
            total[name] = total.get(name, 0) + count
    decisions = {k: v for k, v in total.items() if not k.startswith("sessions:") and v}
    sessions = {
        k.removeprefix("sessions:"): v for k, v in total.items() if k.startswith("sessions:")
    }
    n = sum(decisions.values())
    shares = [f"{name} {100 * count / n:.1f}%" for name, count in decisions.items()]
    per_node = ", ".join(f"{name} {count}" for name, count in sessions.items())
    return f"{', '.join(shares) or 'none'} of {n} reads; sessions {per_node}"


def _plot(runs: dict[str, list[_Run]], png: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(VARIANTS))
    colors = [COLORS[v] for v in VARIANTS]

    def bars(ax: Any, offset: float, width: float, attr: str, **kw: Any) -> None:
        for i, variant in enumerate(VARIANTS):
            values = [getattr(r, attr) for r in runs[variant]]
            m = statistics.median(values)
            ax.bar(
                i + offset,
                m,
                width,
                yerr=[[m - min(values)], [max(values) - m]],
                capsize=4,
                color=colors[i],
                **kw,
            )

    bars(axes[0], 0, 0.6, "replica_pct")
    axes[0].axhline(90, color="black", linestyle="--", linewidth=1, label="goal for lsn: 90%")
    axes[0].set_title("reads on replicas %")
    axes[0].set_ylim(0, 105)
    axes[0].legend(loc="center right")
    bars(axes[1], -0.2, 0.4, "p50_ms")
    bars(axes[1], 0.2, 0.4, "p99_ms", alpha=0.5, hatch="//")
    axes[1].set_title("read latency ms (p50 solid, p99 hatched)")
    stale = [sum(r.stale for r in runs[v]) for v in VARIANTS]
    axes[2].bar(list(x), stale, 0.6, color=colors)
    for i, n in enumerate(stale):
        axes[2].annotate(str(n), (i, n), ha="center", va="bottom")
    axes[2].set_title("stale reads of own write (sum)")
    for ax in axes:
        ax.set_xticks(list(x), list(VARIANTS))
    fig.suptitle(
        f"Read-your-writes, replicas {APPLY_DELAY} behind, {int(WRITE_SHARE * 100)}% writes "
        "(median, min-max bars)"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
