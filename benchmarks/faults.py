"""Faults under load: what readers and writers see while a node fails and comes back.

One uvicorn process serves the router app over the primary and both replicas. Our own
load generator (it records every request) reads through ``Depends(router.reader)`` and
``router.run_read`` alternately, while a trickle of writes keeps WAL moving. In turn:
replica-1 killed (SIGKILL), replica-2 stopped (fast shutdown), replay paused on
replica-1 past the lag bound. Then, under write load, the primary is stopped and
started again; every acknowledged write must be in the table exactly once.

Ejection and readmission are seen by polling the app's ``/health/nodes``.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from ._common import (
    AppServer,
    Table,
    http_get_json,
    log_dir,
    percentile,
    router_env,
    start_pyload,
    stop_pyload,
)

READ_PATHS = ("/items/", "/rr/items/")
PATH_NAMES = ("reader", "run_read")
SETTINGS = {"health_interval": 0.25, "health_timeout": 1.0, "max_lag_seconds": 1.0}
CONCURRENCY = 8


@dataclass
class Fault:
    name: str
    node: str
    inject: Callable[[], None]
    recover: Callable[[], None]
    t_fault: float = 0.0
    t_eject: float | None = None
    t_recover: float = 0.0
    t_readmit: float | None = None
    t_end: float = 0.0


def _healthy(base: str, node: str) -> bool | None:
    try:
        data = http_get_json(base + "/health/nodes", timeout=1.0)
    except Exception:
        return None
    for entry in data.get("nodes", []):
        if entry.get("name") == node:
            return bool(entry.get("healthy"))
    return None


def _wait_health(base: str, node: str, healthy: bool, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(base, node) is healthy:
            return time.monotonic()
        time.sleep(0.02)
    return None


def _play(base: str, fault: Fault, hold: float) -> None:
    fault.t_fault = time.monotonic()
    fault.inject()
    fault.t_eject = _wait_health(base, fault.node, False, timeout=15)
    time.sleep(hold)
    fault.t_recover = time.monotonic()
    fault.recover()
    fault.t_readmit = _wait_health(base, fault.node, True, timeout=30)
    time.sleep(0.5)
    fault.t_end = time.monotonic()


class _Trickle(threading.Thread):
    """A few writes a second through the app, so that a paused replica falls behind."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.stopping = threading.Event()
        self.failed = 0

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            request = urllib.request.Request(self.base + "/items", method="POST", data=b"")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
            except Exception:
                self.failed += 1


def _window(records: list[list[Any]], start: float, end: float, which: int | None) -> list[Any]:
    """Requests in flight at any time in [start, end] (so also those the fault cut off)."""
    return [
        r
        for r in records
        if r[0] <= end and r[0] + r[1] >= start and (which is None or r[3] == which)
    ]


def _fmt(t: float | None, since: float) -> str:
    return "not seen" if t is None else f"{t - since:.2f}"


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    hold = 1.0 if quick else 2.0
    baseline = 1.0 if quick else 3.0
    logs = log_dir(out_dir)
    faults = [
        Fault(
            "replica kill -9",
            "replica-1",
            lambda: cluster.kill_node("replica-1"),
            lambda: cluster.start_node("replica-1"),
        ),
        Fault(
            "replica stop (fast)",
            "replica-2",
            lambda: cluster.stop_node("replica-2", "fast"),
            lambda: cluster.start_node("replica-2"),
        ),
        Fault(
            "replay paused > lag bound",
            "replica-1",
            lambda: cluster.pause_replay("replica-1"),
            lambda: cluster.resume_replay("replica-1"),
        ),
    ]
    primary_fault = Fault(
        "primary stop + start, under writes",
        "primary",
        lambda: cluster.stop_node("primary", "fast"),
        lambda: cluster.start_node("primary"),
    )
    env = router_env(cluster.primary_url, cluster.replica_urls, **SETTINGS)
    tag = f"f{int(time.time())}"
    with AppServer(env, logs) as app:
        # Reads, with replica faults.
        read_out = logs / "faults-read.json"
        load = start_pyload(
            app.base,
            read_out,
            seconds=600,
            concurrency=CONCURRENCY,
            read_paths=READ_PATHS,
        )
        trickle = _Trickle(app.base)
        trickle.start()
        try:
            time.sleep(baseline)
            t_base = time.monotonic()
            for fault in faults:
                _play(app.base, fault, hold)
                time.sleep(0.5)
        finally:
            trickle.stopping.set()
            reads = stop_pyload(load, read_out)
        trickle.join()
        # Writes, with a primary restart.
        write_out = logs / "faults-write.json"
        load = start_pyload(
            app.base, write_out, seconds=600, concurrency=CONCURRENCY, mode="write", tag=tag
        )
        try:
            time.sleep(baseline)
            t_wbase = time.monotonic()
            _play(app.base, primary_fault, hold)
        finally:
            writes = stop_pyload(load, write_out)
    cluster.wait_for_replay()

    table = Table(
        name="faults",
        title=(
            f"Faults under load ({CONCURRENCY} connections, health interval "
            f"{SETTINGS['health_interval']} s, lag bound {SETTINGS['max_lag_seconds']} s)"
        ),
        columns=[
            "fault",
            "path",
            "requests in window",
            "failed",
            "p99 ms in window",
            "p99 ms before faults",
            "fault to ejection s",
            "recovery to readmission s",
        ],
    )
    rec = reads["records"]
    for fault in faults:
        for which, label in enumerate(PATH_NAMES):
            window = _window(rec, fault.t_fault, fault.t_end, which)
            base = _window(rec, t_base - baseline + 0.5, t_base, which)
            table.rows.append(
                [
                    fault.name,
                    label,
                    str(len(window)),
                    str(sum(1 for r in window if not 200 <= r[2] < 300)),
                    f"{percentile([r[1] for r in window], 99) * 1000:.1f}",
                    f"{percentile([r[1] for r in base], 99) * 1000:.1f}",
                    _fmt(fault.t_eject, fault.t_fault),
                    _fmt(fault.t_readmit, fault.t_recover),
                ]
            )
    wrec = writes["records"]
    window = _window(wrec, primary_fault.t_fault, primary_fault.t_end, None)
    wbase = _window(wrec, t_wbase - baseline + 0.5, t_wbase, None)
    table.rows.append(
        [
            primary_fault.name,
            "writer",
            str(len(window)),
            str(sum(1 for r in window if not 200 <= r[2] < 300)),
            f"{percentile([r[1] for r in window], 99) * 1000:.1f}",
            f"{percentile([r[1] for r in wbase], 99) * 1000:.1f}",
            _fmt(primary_fault.t_eject, primary_fault.t_fault),
            _fmt(primary_fault.t_readmit, primary_fault.t_recover),
        ]
    )
    table.notes += _check_writes(cluster, writes, tag)
    failed_reads = sum(1 for r in rec if not 200 <= r[2] < 300)
    table.notes.append(
        f"Reads over the whole read phase: {len(rec)} requests, {failed_reads} failed "
        f"(goal: zero failed reads on a replica fault). Background writes that failed: "
        f"{trickle.failed}. A fault's window runs from the fault until 0.5 s after "
        f"readmission; each fault is held {hold:.0f} s after ejection before recovery."
    )
    table.png = _plot(reads, writes, faults, primary_fault, out_dir / "faults.png")
    return table


def _check_writes(cluster: Any, writes: dict[str, Any], tag: str) -> list[str]:
    acked: list[str] = writes["acked"]
    rows = cluster.execute(
        "primary", f"SELECT k, count(*) FROM items WHERE k LIKE '{tag}-%' GROUP BY k"
    )
    counts = {k: int(n) for k, n in rows}
    lost = [k for k in acked if k not in counts]
    doubled = [k for k, n in counts.items() if n > 1]
    unacked = len(set(counts) - set(acked))
    verdict = "OK" if not lost and not doubled else "FAILED"
    return [
        f"Primary restart: {len(acked)} writes acknowledged (2xx), {len(lost)} of them lost, "
        f"{len(doubled)} stored more than once: {verdict}. {unacked} rows were committed "
        f"without a 2xx (the client saw an error; allowed, the promise is about 2xx only); "
        f"{len(writes['sent']) - len(acked)} writes failed in all."
    ]


def _plot(
    reads: dict[str, Any],
    writes: dict[str, Any],
    faults: list[Fault],
    primary_fault: Fault,
    png: Path,
) -> Path:
    fig, axes = plt.subplots(2, 1, figsize=(12, 7))
    for ax, data, marks, title in (
        (axes[0], reads, faults, "reads (reader and run_read)"),
        (axes[1], writes, [primary_fault], "writes"),
    ):
        rec = data["records"]
        if not rec:
            continue
        t0 = min(r[0] for r in rec)
        ok = [r for r in rec if 200 <= r[2] < 300]
        bad = [r for r in rec if not 200 <= r[2] < 300]
        ax.scatter([r[0] - t0 for r in ok], [r[1] * 1000 for r in ok], s=1, label="2xx")
        ax.scatter(
            [r[0] - t0 for r in bad], [r[1] * 1000 for r in bad], s=8, c="red", label="failed"
        )
        for fault in marks:
            ax.axvspan(fault.t_fault - t0, fault.t_end - t0, alpha=0.15, color="gray")
            ax.text(fault.t_fault - t0, 0.9, fault.name, transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_ylabel("latency ms")
        ax.set_title(title)
        ax.legend(loc="upper right")
    axes[1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
