"""Against pgpool-II: ``get_db`` through pgpool vs ``router.reader`` over the replicas.

pgpool-II (the Debian ``pgpool2`` package) runs on loopback in streaming-replication
mode, load balancing reads over the two replicas (the primary's weight is 0). The app
with ``get_db`` reads through pgpool; the router app reads from the replicas directly.
A fresh pgpool per round; variants interleaved; reads only, ``wrk`` at 16 connections.

CPU per request sums utime+stime of uvicorn, pgpool and every PostgreSQL process (from
/proc). Statements on the primary per read are the primary's ``xact_commit +
xact_rollback`` delta, read after the app and pgpool exit (so their stats are flushed).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib.pyplot as plt

from ._common import (
    CONCURRENCY,
    AppServer,
    CpuMeter,
    LoadResult,
    Table,
    free_port,
    get_db_env,
    log_dir,
    postgres_pids,
    ratio,
    router_env,
    run_load,
    spawn,
    spread,
    terminate,
)

VARIANTS = ("get_db via pgpool", "router")


class PgPool:
    """pgpool-II in the foreground, in a temporary directory, on a free port."""

    def __init__(self, cluster: Any, logs: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pgpool-"))
        self.port = free_port()
        nodes = [cluster.primary, *cluster.replicas]
        conf = {
            "backend_clustering_mode": "streaming_replication",
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "socket_dir": str(self.dir),
            "pcp_listen_addresses": "",
            "pcp_port": free_port(),
            "pcp_socket_dir": str(self.dir),
            "pid_file_name": str(self.dir / "pgpool.pid"),
            "logdir": str(self.dir),
            "log_destination": "stderr",
            "num_init_children": 32,
            "max_pool": 1,
            "connection_cache": "on",
            "load_balance_mode": "on",
            "statement_level_load_balance": "off",
            "enable_pool_hba": "off",
            "allow_clear_text_frontend_auth": "on",
            "pool_passwd": "",
            "sr_check_period": 0,
            "sr_check_user": cluster.user,
            "sr_check_password": cluster.password,
            "health_check_period": 0,
            "failover_on_backend_error": "off",
            "use_watchdog": "off",
        }
        for i, node in enumerate(nodes):
            conf[f"backend_hostname{i}"] = "127.0.0.1"
            conf[f"backend_port{i}"] = node.port
            conf[f"backend_weight{i}"] = 0 if i == 0 else 1
            conf[f"backend_flag{i}"] = "DISALLOW_TO_FAILOVER"
        lines = [f"{k} = {v}" if isinstance(v, int) else f"{k} = '{v}'" for k, v in conf.items()]
        (self.dir / "pgpool.conf").write_text("\n".join(lines) + "\n")
        (self.dir / "pcp.conf").write_text("")
        (self.dir / "pool_hba.conf").write_text("")
        self._log = open(logs / f"pgpool-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = spawn(
            [
                shutil.which("pgpool") or "/usr/sbin/pgpool",
                "-n",
                "-f",
                str(self.dir / "pgpool.conf"),
                "-F",
                str(self.dir / "pcp.conf"),
                "-a",
                str(self.dir / "pool_hba.conf"),
            ],
            stdout=self._log,
            stderr=self._log,
        )
        quoted = f"{quote(cluster.user, safe='')}:{quote(cluster.password, safe='')}"
        self.url = f"postgresql+asyncpg://{quoted}@127.0.0.1:{self.port}/{cluster.database}"
        deadline = time.monotonic() + 20
        while not (self.dir / f".s.PGSQL.{self.port}").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"pgpool did not start; see {self._log.name}")
            time.sleep(0.05)
        time.sleep(0.3)

    def close(self) -> None:
        terminate(self.proc, grace=10.0)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _primary_xacts(cluster: Any) -> int:
    rows = cluster.execute(
        "primary",
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        f"WHERE datname = '{cluster.database}'",
    )
    return int(rows[0][0])


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    table = Table(
        name="pgpool",
        title=(
            f"Against pgpool-II: reads over 2 replicas, {CONCURRENCY} connections "
            "(median (min-max) across rounds)"
        ),
        columns=[
            "variant",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/req (all)",
            "uvicorn ms/req",
            "pgpool ms/req",
            "PostgreSQL ms/req",
            "primary xacts per read",
        ],
    )
    if shutil.which("pgpool") is None and not Path("/usr/sbin/pgpool").exists():
        table.notes.append("Skipped: pgpool-II is not installed (apt-get install pgpool2).")
        return table
    rounds = 1 if quick else 3
    seconds, warm = (2, 1) if quick else (6, 2)
    logs = log_dir(out_dir)
    results: dict[str, list[LoadResult]] = {v: [] for v in VARIANTS}
    cpu: dict[str, dict[str, list[float]]] = {
        v: {g: [] for g in ("all", "app", "pgpool", "postgres")} for v in VARIANTS
    }
    primary_per_read: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            xacts0 = _primary_xacts(cluster)
            pool = PgPool(cluster, logs) if variant != "router" else None
            try:
                if pool is not None:
                    env = get_db_env(pool.url, cluster.primary_url)
                else:
                    env = router_env(cluster.primary_url, cluster.replica_urls)
                with AppServer(env, logs) as app:
                    warmed = run_load(app.base, "/items/", warm)
                    groups = {"app": [app.pid], "postgres": postgres_pids(cluster)}
                    if pool is not None:
                        groups["pgpool"] = [pool.proc.pid]
                    meter = CpuMeter(groups)
                    meter.start()
                    res = run_load(app.base, "/items/", seconds)
                    used = meter.stop()
            finally:
                if pool is not None:
                    pool.close()
            time.sleep(0.5)  # exited backends have flushed their statistics
            xacts = _primary_xacts(cluster) - xacts0
            results[variant].append(res)
            n = max(1, res.requests)
            for group in ("app", "pgpool", "postgres"):
                cpu[variant][group].append(1000 * used.get(group, 0.0) / n)
            cpu[variant]["all"].append(1000 * sum(used.values()) / n)
            primary_per_read[variant].append(xacts / max(1, res.requests + warmed.requests))
    for variant in VARIANTS:
        rs = results[variant]
        table.rows.append(
            [
                variant,
                spread([r.rps for r in rs], 0),
                spread([r.p50_ms for r in rs], 2),
                spread([r.p99_ms for r in rs], 2),
                spread(cpu[variant]["all"], 3),
                spread(cpu[variant]["app"], 3),
                spread(cpu[variant]["pgpool"], 3),
                spread(cpu[variant]["postgres"], 3),
                spread(primary_per_read[variant], 3),
            ]
        )
    a, b = results["router"], results["get_db via pgpool"]
    rps = ratio([r.rps for r in a], [r.rps for r in b])
    p50 = ratio([r.p50_ms for r in a], [r.p50_ms for r in b])
    p99 = ratio([r.p99_ms for r in a], [r.p99_ms for r in b])
    cpu_ratio = ratio(cpu["router"]["all"], cpu["get_db via pgpool"]["all"])
    table.rows.append(
        [
            "**router / pgpool**",
            f"{rps:.3f}",
            f"{p50:.3f}",
            f"{p99:.3f}",
            f"{cpu_ratio:.3f}",
            "",
            "",
            "",
            "",
        ]
    )
    goals = [
        ("req/s at least pgpool's", rps >= 1.0),
        ("lower p50", p50 < 1.0),
        ("at most 0.8x CPU per request", cpu_ratio <= 0.8),
        ("zero primary statements per read", statistics.median(primary_per_read["router"]) < 0.01),
    ]
    table.notes.append(
        "Goals: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals) + "."
    )
    table.notes.append(
        "Primary xacts per read include everything the primary ran while the variant was up, "
        "divided by all requests sent (warm-up included): for the router that is its health "
        "probe of the primary (one per interval), not reads; with pgpool, each read's "
        "BEGIN/ROLLBACK is also sent to the primary."
    )
    table.png = _plot(results, cpu, out_dir / "pgpool.png")
    return table


def _plot(
    results: dict[str, list[LoadResult]], cpu: dict[str, dict[str, list[float]]], png: Path
) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = (
        ("req/s", [[r.rps for r in results[v]] for v in VARIANTS]),
        ("p50 ms", [[r.p50_ms for r in results[v]] for v in VARIANTS]),
        ("CPU ms per request (all processes)", [cpu[v]["all"] for v in VARIANTS]),
    )
    for ax, (label, series) in zip(axes, panels, strict=True):
        for i, values in enumerate(series):
            m = statistics.median(values)
            ax.bar(i, m, yerr=[[m - min(values)], [max(values) - m]], capsize=4)
        ax.set_xticks(range(len(VARIANTS)), list(VARIANTS))
        ax.set_title(label)
    fig.suptitle("get_db through pgpool-II vs ReplicaRouter (median, min-max)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
