"""Against pgpool-II: ``get_db`` through pgpool vs ``router.reader`` over the replicas.

pgpool-II (the Debian ``pgpool2`` package) runs on loopback in streaming-replication
mode, load balancing reads over the two replicas (the primary's weight is 0). The app
with ``get_db`` reads through pgpool; the router app reads from the replicas directly.
A fresh pgpool per run; variants interleaved; reads only (``GET /items/{id}``), from
``benchmarks._loadgen``; pool 10 + overflow 0 on every engine of every variant.

Two cases:

- *1 worker, 16 connections*: uvicorn is the bottleneck on one core; what matters is
  CPU per request over everything (app + proxy + servers).
- *2 workers, 32 connections* (``uvicorn --workers 2``): the app on both cores, as
  in production, so the proxy's CPU comes out of the app's; req/s and latency, with
  ``get_db`` on one replica directly (no proxy) as a ceiling.

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
    LOAD_COLUMNS,
    LOAD_GENERATOR,
    TIMEOUT,
    AppServer,
    CpuMeter,
    LoadResult,
    Table,
    free_port,
    get_db_env,
    load_cells,
    log_dir,
    pool_env,
    postgres_pids,
    process_tree,
    ratio,
    router_env,
    run_load,
    spawn,
    spread,
    spread_bar,
    terminate,
)

PGPOOL = "get_db via pgpool"
ROUTER = "router"
ONE = "1 worker, 16 conns"
TWO = "2 workers, 32 conns"
# pool_size, max_overflow of every engine (get_db's, each router node's), per worker.
POOL = (10, 0)
CPU_GROUPS = (
    ("app", "uvicorn", "tab:green"),
    ("pgpool", "pgpool", "tab:red"),
    ("postgres", "PostgreSQL", "tab:purple"),
)


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


def _direct_variant(cluster: Any) -> str:
    return f"get_db on {cluster.replicas[0].name} (no proxy)"


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    direct = _direct_variant(cluster)
    cases = {
        ONE: (1, 16, (PGPOOL, ROUTER)),
        TWO: (2, 32, (PGPOOL, ROUTER, direct)),
    }
    table = Table(
        name="pgpool",
        title=(
            "Against pgpool-II: reads over 2 replicas (median (min-max) across rounds), "
            f"pool {POOL[0]} + overflow {POOL[1]} on every engine"
        ),
        columns=[
            "case",
            "variant",
            *LOAD_COLUMNS,
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
    seconds, warm = (1.5, 0.5) if quick else (10, 2)
    logs = log_dir(out_dir)
    keys = [(case, v) for case, (_, _, variants) in cases.items() for v in variants]
    results: dict[tuple[str, str], list[LoadResult]] = {k: [] for k in keys}
    cpu: dict[tuple[str, str], dict[str, list[float]]] = {
        k: {g: [] for g in ("all", "app", "pgpool", "postgres")} for k in keys
    }
    primary_per_read: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    busiest: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        for case, (workers, connections, variants) in cases.items():
            for variant in variants:
                xacts0 = _primary_xacts(cluster)
                pool = PgPool(cluster, logs) if variant == PGPOOL else None
                try:
                    if pool is not None:
                        env = get_db_env(pool.url, cluster.primary_url)
                    elif variant == ROUTER:
                        env = router_env(cluster.primary_url, cluster.replica_urls)
                    else:
                        env = get_db_env(cluster.replica_urls[0], cluster.primary_url)
                    env.update(pool_env(*POOL))
                    with AppServer(env, logs, workers=workers) as app:
                        warmed = run_load(
                            app.base, "/items/", warm, concurrency=connections, workers=workers
                        )
                        worker_pids = _children(app.pid) if workers > 1 else []
                        groups = {"app": [app.pid], "postgres": postgres_pids(cluster)}
                        if pool is not None:
                            groups["pgpool"] = [pool.proc.pid]
                        for i, pid in enumerate(worker_pids):
                            groups[f"worker-{i}"] = [pid]
                        meter = CpuMeter(groups)
                        meter.start()
                        res = run_load(
                            app.base, "/items/", seconds, concurrency=connections, workers=workers
                        )
                        used = meter.stop()
                finally:
                    if pool is not None:
                        pool.close()
                time.sleep(0.5)  # exited backends have flushed their statistics
                xacts = _primary_xacts(cluster) - xacts0
                key = (case, variant)
                results[key].append(res)
                n = max(1, res.requests)
                for group in ("app", "pgpool", "postgres"):
                    cpu[key][group].append(1000 * used.get(group, 0.0) / n)
                total = sum(used.get(g, 0.0) for g in ("app", "pgpool", "postgres"))
                cpu[key]["all"].append(1000 * total / n)
                primary_per_read[key].append(xacts / max(1, res.requests + warmed.requests))
                per_worker = [used[f"worker-{i}"] for i in range(len(worker_pids))]
                if sum(per_worker) > 0:
                    busiest[key].append(max(per_worker) / sum(per_worker))
    for case, (_, _, variants) in cases.items():
        for variant in variants:
            key = (case, variant)
            table.rows.append(
                [
                    case,
                    variant,
                    *load_cells(results[key]),
                    spread(cpu[key]["all"], 3),
                    spread(cpu[key]["app"], 3),
                    spread(cpu[key]["pgpool"], 3),
                    spread(cpu[key]["postgres"], 3),
                    spread(primary_per_read[key], 3),
                ]
            )
        table.rows.append(_ratio_row(case, "**router / pgpool**", results, cpu, ROUTER, PGPOOL))
        if case == TWO:
            table.rows.append(
                _ratio_row(case, "**router / no proxy**", results, cpu, ROUTER, direct)
            )

    def med(key: tuple[str, str], attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[key]))

    cpu_1 = ratio(cpu[(ONE, ROUTER)]["all"], cpu[(ONE, PGPOOL)]["all"])
    rps_2 = med((TWO, ROUTER), "rps") / med((TWO, PGPOOL), "rps")
    p50_2 = med((TWO, ROUTER), "p50_ms") / med((TWO, PGPOOL), "p50_ms")
    primary_reads = statistics.median(x for case in cases for x in primary_per_read[(case, ROUTER)])
    goals = [
        (f"{ONE}: at most 0.8x pgpool's CPU per request ({cpu_1:.3f}x)", cpu_1 <= 0.8),
        (f"{TWO}: at least 1.5x pgpool's req/s ({rps_2:.3f}x)", rps_2 >= 1.5),
        (f"{TWO}: a lower p50 ({p50_2:.3f}x)", p50_2 < 1.0),
        (f"zero primary statements per read ({primary_reads:.3f})", primary_reads < 0.01),
    ]
    table.notes.append(
        "Goals: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals) + "."
    )
    mean_2 = med((TWO, ROUTER), "mean_ms") / med((TWO, PGPOOL), "mean_ms")
    table.notes.append(
        f"{TWO}, mean latency: router {med((TWO, ROUTER), 'mean_ms'):.1f} ms, pgpool "
        f"{med((TWO, PGPOOL), 'mean_ms'):.1f} ms ({mean_2:.3f}x). Every engine has pool 10 + "
        "overflow 0 for 16 connections per worker, so 6 requests per worker wait for a "
        "connection: the router's pool serves them in order, SQLAlchemy's (get_db's, behind "
        "pgpool) lets a returning request go first, which lowers the median and lengthens "
        "the tail. In a closed loop the mean is the connections over the req/s."
    )
    bad = [
        f"{case}, {variant}: {sum(r.errors for r in rs)} errors, "
        f"{sum(r.timeouts for r in rs)} timeouts"
        for (case, variant), rs in results.items()
        if any(r.errors or r.timeouts for r in rs)
    ]
    table.notes.append(
        "Errors and timeouts: " + ("; ".join(bad) if bad else "none in any variant") + "."
    )
    split = [
        f"{variant} {spread([100 * x for x in busiest[(TWO, variant)]], 0)}%"
        for variant in cases[TWO][2]
        if busiest[(TWO, variant)]
    ]
    held = sorted({"/".join(map(str, r.connections_per_worker)) for r in _all(results, TWO)})
    table.notes.append(
        f"{TWO}: uvicorn's supervisor forks the workers, which share one listening socket, "
        "as in production. A burst of new connections lands unevenly on them (in a trial "
        "run one worker did all the work in 2 of 3 rounds), so the load generator "
        "reconnects until each worker "
        f"holds its share, as a balancer in front would: connections per worker "
        f"{', '.join(held)}. The busiest worker's share of the workers' CPU (50% = even): "
        f"{', '.join(split) or 'n/a'}. The no-proxy row reads one replica directly with "
        "get_db: a ceiling without a proxy or routing."
    )
    table.notes.append(
        "CPU per request sums uvicorn (every worker), pgpool and every PostgreSQL process. "
        "Primary xacts per read include everything the primary ran while the variant was "
        "up, divided by all requests sent (warm-up included): for the router that is its "
        "health probe of the primary (one per interval per worker), not reads; with "
        "pgpool, each read's BEGIN/ROLLBACK is also sent to the primary. "
        f"Load generator: {LOAD_GENERATOR}, client timeout {TIMEOUT:g} s; errors: non-2xx "
        "and connection errors."
    )
    table.png = _plot(cases, results, cpu, rounds, out_dir / "pgpool.png")
    return table


def _ratio_row(
    case: str,
    label: str,
    results: dict[tuple[str, str], list[LoadResult]],
    cpu: dict[tuple[str, str], dict[str, list[float]]],
    a: str,
    b: str,
) -> list[str]:
    ra, rb = results[(case, a)], results[(case, b)]
    cells = [
        f"{ratio([getattr(r, attr) for r in ra], [getattr(r, attr) for r in rb]):.3f}"
        for attr in ("rps", "p50_ms", "p99_ms", "max_ms")
    ]
    return [
        case,
        label,
        *cells,
        "",
        "",
        f"{ratio(cpu[(case, a)]['all'], cpu[(case, b)]['all']):.3f}",
        "",
        "",
        "",
        "",
    ]


def _all(results: dict[tuple[str, str], list[LoadResult]], case: str) -> list[LoadResult]:
    return [r for (c, _), rs in results.items() if c == case for r in rs]


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (uvicorn's workers)."""
    return [p for p in process_tree(pid) if p != pid and _ppid(p) == pid]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _plot(
    cases: dict[str, tuple[int, int, tuple[str, ...]]],
    results: dict[tuple[str, str], list[LoadResult]],
    cpu: dict[tuple[str, str], dict[str, list[float]]],
    rounds: int,
    png: Path,
) -> Path:
    fig, axes = plt.subplots(len(cases), 4, figsize=(17, 4.2 * len(cases)), squeeze=False)
    colors = {PGPOOL: "tab:blue", ROUTER: "tab:orange"}
    for row, (case, (_, _, variants)) in zip(axes, cases.items(), strict=True):
        names = [_short(v) for v in variants]
        for ax, (title, unit, attr) in zip(
            row[:3],
            (("throughput", "req/s", "rps"), ("p50", "ms", "p50_ms"), ("p99", "ms", "p99_ms")),
            strict=True,
        ):
            for i, variant in enumerate(variants):
                spread_bar(
                    ax,
                    i,
                    [getattr(r, attr) for r in results[(case, variant)]],
                    color=colors.get(variant, "tab:gray"),
                )
            ax.set_xticks(range(len(variants)), names)
            ax.set_ylabel(unit)
            ax.set_title(f"{case}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        ax = row[3]
        bottom = [0.0] * len(variants)
        for group, label, color in CPU_GROUPS:
            values = [statistics.median(cpu[(case, v)][group]) for v in variants]
            ax.bar(range(len(variants)), values, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(variants)), names)
        ax.set_ylim(top=max(bottom) * 1.3)  # room for the legend above the bars
        ax.set_ylabel("CPU ms per request")
        ax.set_title(f"{case}: CPU per request (median)", fontsize=10)
        ax.legend(fontsize=8, loc="upper center", ncols=len(CPU_GROUPS))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"get_db through pgpool-II vs ReplicaRouter over 2 replicas, pool {POOL[0]} + "
        f"{POOL[1]}, {rounds} round(s): bar = median, whisker = min-max over rounds"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _short(variant: str) -> str:
    return variant.replace(" (no proxy)", "\n(no proxy)").replace(" via ", "\nvia ")
