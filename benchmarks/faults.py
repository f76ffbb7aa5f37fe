"""Faults under load: what readers and writers see while a node fails and comes back.

One uvicorn process serves the router app over the primary and both replicas. Our own
load generator (it records every request) reads through ``Depends(router.reader)`` and
``router.run_read`` alternately, while a trickle of writes keeps WAL moving. In turn:
replica-1 killed (SIGKILL), replica-2 stopped (fast shutdown), replay paused on
replica-1 past the lag bound. Then, under write load, the primary is stopped and
started again; every acknowledged write must be in the table exactly once.

Then two hung servers (``freeze_node``: SIGSTOP of every process of the node, which
keeps its connections open and answers nothing). The primary, frozen for 10 s under
reads and writes at once: reads must not notice, writes fail within their bound and
are acknowledged again soon after the thaw, and again no acknowledged write is lost
or doubled. Replica-1, frozen for 15 s under reads and the trickle of writes, served by
a second uvicorn process whose router bounds a reader statement with
``REPLICA_ROUTER_READ_TIMEOUT=2`` (the default is 5 s). ``--quick`` freezes each for 5 s.

Ejection and readmission are seen by polling the app's ``/health/nodes``, and a node
serving again by its ``sessions`` counter there.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from ._loadgen import CLIENT_TIMEOUT, CONNECTION_ERROR
from ._loadgen import TIMEOUT as LOADGEN_TIMEOUT

READ_PATHS = ("/items/", "/rr/items/")
PATH_NAMES = ("reader", "run_read")
SETTINGS = {"health_interval": 0.25, "health_timeout": 1.0, "max_lag_seconds": 1.0}
CONCURRENCY = 8
HUNG_READ_TIMEOUT = 2  # REPLICA_ROUTER_READ_TIMEOUT of the hung-replica app, seconds

Records = list[list[Any]]


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
    t_served: float | None = None
    t_end: float = 0.0


def _node(base: str, node: str) -> dict[str, Any] | None:
    try:
        data = http_get_json(base + "/health/nodes", timeout=1.0)
    except Exception:
        return None
    for entry in data.get("nodes", []):
        if entry.get("name") == node:
            found: dict[str, Any] = entry
            return found
    return None


def _healthy(base: str, node: str) -> bool | None:
    entry = _node(base, node)
    return None if entry is None else bool(entry.get("healthy"))


def _sessions(base: str, node: str) -> int | None:
    """Sessions the router handed out on ``node`` so far (each after a proven BEGIN)."""
    entry = _node(base, node)
    return None if entry is None else int(entry.get("sessions", 0))


def _wait_health(base: str, node: str, healthy: bool, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(base, node) is healthy:
            return time.monotonic()
        time.sleep(0.02)
    return None


def _wait_served(base: str, node: str, before: int | None, timeout: float) -> float | None:
    """When ``node`` got a session after its count was ``before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _sessions(base, node)
        if now is not None and before is not None and now > before:
            return time.monotonic()
        if before is None:
            before = now
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


def _hang(base: str, fault: Fault, seconds: float) -> None:
    """Freeze the node for ``seconds`` from the freeze (not from its ejection), thaw it,
    and wait until it is readmitted and serves again."""
    fault.t_fault = time.monotonic()
    fault.inject()
    try:
        fault.t_eject = _wait_health(base, fault.node, False, timeout=seconds)
        time.sleep(max(0.0, fault.t_fault + seconds - time.monotonic()))
        before = _sessions(base, fault.node)  # no session starts on a frozen node
    finally:
        fault.t_recover = time.monotonic()
        fault.recover()
    fault.t_readmit = _wait_health(base, fault.node, True, timeout=30)
    fault.t_served = _wait_served(base, fault.node, before, timeout=10)
    time.sleep(0.5)
    fault.t_end = time.monotonic()


def _settle(cluster: Any, base: str, timeout: float = 30.0) -> None:
    """Until every replica streams from the primary and the app sees every node fit,
    so that a scenario does not start on the tail of the one before."""
    cluster.wait_for_replay(timeout)
    names = [node.name for node in cluster.nodes]
    sql = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    deadline = time.monotonic() + timeout
    while True:
        streaming = int(cluster.execute("primary", sql)[0][0])
        if streaming == len(names) - 1 and all(_healthy(base, n) for n in names):
            return
        if time.monotonic() > deadline:
            msg = f"the cluster did not settle in {timeout:g} s ({streaming} replicas streaming)"
            raise RuntimeError(msg)
        time.sleep(0.05)


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


def _window(records: Records, start: float, end: float, which: int | None) -> Records:
    """Requests in flight at any time in [start, end] (so also those the fault cut off)."""
    return [
        r
        for r in records
        if r[0] <= end and r[0] + r[1] >= start and (which is None or r[3] == which)
    ]


def _before(records: Records, start: float, end: float, which: int | None) -> Records:
    """Requests that started and ended in [start, end]: a baseline before a freeze, which
    leaves out those the freeze caught in flight."""
    return [
        r
        for r in records
        if r[0] >= start and r[0] + r[1] <= end and (which is None or r[3] == which)
    ]


def _failed(records: Records) -> Records:
    return [r for r in records if not 200 <= r[2] < 300]


def _kinds(records: Records) -> str:
    """The failed requests among ``records``, by kind."""
    bad = _failed(records)
    if not bad:
        return "none"
    timeouts = sum(1 for r in bad if r[2] == CLIENT_TIMEOUT)
    lost = sum(1 for r in bad if r[2] == CONNECTION_ERROR)
    server = sum(1 for r in bad if r[2] >= 500)
    other = len(bad) - timeouts - lost - server
    parts = [f"{server} 5xx", f"{timeouts} client timeouts", f"{lost} connection errors"]
    return ", ".join(parts + ([f"{other} other"] if other else []))


def _first_ok_after(records: Records, since: float) -> float | None:
    """When the first 2xx response after ``since`` arrived."""
    done = [r[0] + r[1] for r in records if 200 <= r[2] < 300 and r[0] + r[1] >= since]
    return min(done, default=None)


def _fmt(t: float | None, since: float) -> str:
    return "not seen" if t is None else f"{t - since:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _row(fault: Fault, path: str, window: Records, base: Records, service: str) -> list[str]:
    latencies = [r[1] for r in window]
    return [
        fault.name,
        path,
        str(len(window)),
        str(len(_failed(window))),
        _ms(percentile(latencies, 99)),
        _ms(max(latencies, default=float("nan"))),
        _ms(percentile([r[1] for r in base], 99)),
        _fmt(fault.t_eject, fault.t_fault),
        _fmt(fault.t_readmit, fault.t_recover),
        service,
    ]


@contextlib.contextmanager
def _apps(
    env: dict[str, str], hung_env: dict[str, str], logs: Path
) -> Iterator[tuple[AppServer, AppServer]]:
    """Both uvicorn processes, started side by side before any load (the second, for
    the hung replica, idles until then: it costs the others a few probes a second)."""
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(max_workers=1) as pool:
            later = pool.submit(AppServer, hung_env, logs)
            try:
                app = stack.enter_context(AppServer(env, logs))
            finally:
                hung_app = stack.enter_context(later.result())
        yield app, hung_app


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    hold = 1.0 if quick else 2.0
    baseline = 1.0 if quick else 3.0
    primary_freeze = 5.0 if quick else 10.0
    replica_freeze = 5.0 if quick else 15.0
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
    hung_primary = Fault(
        f"primary frozen {primary_freeze:g} s, under reads + writes",
        "primary",
        lambda: cluster.freeze_node("primary"),
        lambda: cluster.thaw_node("primary"),
    )
    hung_replica = Fault(
        f"replica-1 frozen {replica_freeze:g} s (read timeout {HUNG_READ_TIMEOUT} s)",
        "replica-1",
        lambda: cluster.freeze_node("replica-1"),
        lambda: cluster.thaw_node("replica-1"),
    )
    env = router_env(cluster.primary_url, cluster.replica_urls, **SETTINGS)
    hung_env = router_env(
        cluster.primary_url, cluster.replica_urls, **SETTINGS, read_timeout=HUNG_READ_TIMEOUT
    )
    tag = f"f{int(time.time())}"
    hung_tag = f"{tag}h"
    with _apps(env, hung_env, logs) as (app, hung_app):
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
        # Reads and writes at once, with a hung primary.
        _settle(cluster, app.base)
        hp_read_out = logs / "faults-hung-primary-read.json"
        hp_write_out = logs / "faults-hung-primary-write.json"
        read_load = start_pyload(
            app.base, hp_read_out, seconds=600, concurrency=CONCURRENCY, read_paths=READ_PATHS
        )
        write_load = start_pyload(
            app.base,
            hp_write_out,
            seconds=600,
            concurrency=CONCURRENCY,
            mode="write",
            tag=hung_tag,
        )
        try:
            time.sleep(baseline)
            _hang(app.base, hung_primary, primary_freeze)
        finally:
            hp_reads = stop_pyload(read_load, hp_read_out)
            hp_writes = stop_pyload(write_load, hp_write_out)
        # Reads (and the trickle of writes), with a hung replica, on the second app.
        _settle(cluster, hung_app.base)
        hr_out = logs / "faults-hung-replica.json"
        load = start_pyload(
            hung_app.base, hr_out, seconds=600, concurrency=CONCURRENCY, read_paths=READ_PATHS
        )
        hung_trickle = _Trickle(hung_app.base)
        hung_trickle.start()
        try:
            time.sleep(baseline)
            _hang(hung_app.base, hung_replica, replica_freeze)
        finally:
            hung_trickle.stopping.set()
            hr_reads = stop_pyload(load, hr_out)
        hung_trickle.join()
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
            "max ms in window",
            "p99 ms before faults",
            "fault to ejection s",
            "recovery to readmission s",
            "recovery to service s",
        ],
    )
    rec = reads["records"]
    for fault in faults:
        for which, label in enumerate(PATH_NAMES):
            window = _window(rec, fault.t_fault, fault.t_end, which)
            base = _window(rec, t_base - baseline + 0.5, t_base, which)
            table.rows.append(_row(fault, label, window, base, "n/a"))
    wrec = writes["records"]
    window = _window(wrec, primary_fault.t_fault, primary_fault.t_end, None)
    wbase = _window(wrec, t_wbase - baseline + 0.5, t_wbase, None)
    back = _first_ok_after(wrec, primary_fault.t_recover)
    table.rows.append(
        _row(primary_fault, "writer", window, wbase, _fmt(back, primary_fault.t_recover))
    )
    hp = _hung_rows(table, hung_primary, hp_reads["records"], baseline)
    hp_wrec = hp_writes["records"]
    hp_wwindow = _window(hp_wrec, hung_primary.t_fault, hung_primary.t_end, None)
    hp_wbase = _before(hp_wrec, hung_primary.t_fault - baseline + 0.5, hung_primary.t_fault, None)
    hp_back = _first_ok_after(hp_wrec, hung_primary.t_recover)
    table.rows.append(
        _row(hung_primary, "writer", hp_wwindow, hp_wbase, _fmt(hp_back, hung_primary.t_recover))
    )
    hr = _hung_rows(table, hung_replica, hr_reads["records"], baseline, served=True)

    table.notes += _check_writes(cluster, writes, tag, "Primary restart")
    failed_reads = sum(1 for r in rec if not 200 <= r[2] < 300)
    table.notes.append(
        f"Reads over the whole read phase: {len(rec)} requests, {failed_reads} failed "
        f"(goal: zero failed reads on a replica fault). Background writes that failed: "
        f"{trickle.failed}. A fault's window runs from the fault until 0.5 s after "
        f"readmission; each fault is held {hold:.0f} s after ejection before recovery."
    )
    hp_wfailed = _failed(hp_wwindow)
    table.notes.append(
        f"Hung primary: every process of the primary SIGSTOPped for {primary_freeze:g} s "
        f"(then SIGCONT) under {CONCURRENCY} read and {CONCURRENCY} write connections at "
        f"once, same app and settings. Reads in the window: {_summary(hp)}. Writes in the "
        f"window: {len(hp_wwindow) - len(hp_wfailed)} acknowledged, {len(hp_wfailed)} "
        f"failed ({_kinds(hp_wwindow)}); the slowest acknowledged write took "
        f"{_slowest([r for r in hp_wwindow if 200 <= r[2] < 300])}, the slowest failed "
        f"one {_slowest(hp_wfailed)}; the first write was acknowledged "
        f"{_fmt(hp_back, hung_primary.t_recover)} s after the thaw."
    )
    table.notes += _check_writes(cluster, hp_writes, hung_tag, "Hung primary")
    table.notes.append(
        f"Hung replica: every process of replica-1 SIGSTOPped for {replica_freeze:g} s "
        f"under {CONCURRENCY} read connections (half plain `/items/`, half `/rr/items/` "
        f"through `router.run_read`) and the background writes, on a second uvicorn "
        f"process whose router has **`REPLICA_ROUTER_READ_TIMEOUT={HUNG_READ_TIMEOUT}`** "
        f"(the default is 5 s), other settings as above. Reads in the window: "
        f"{_summary(hr)}. Replica-1 was readmitted "
        f"{_fmt(hung_replica.t_readmit, hung_replica.t_recover)} s and served its first "
        f"session {_fmt(hung_replica.t_served, hung_replica.t_recover)} s after the thaw. "
        f"Background writes that failed: {hung_trickle.failed}."
    )
    table.notes.append(
        "For the frozen nodes, the window runs from the freeze until 0.5 s after the node "
        "was readmitted and served a session again; *p99 before faults* is that "
        f"scenario's own last {baseline - 0.5:g} s before the freeze (requests that ended "
        "before it). *Recovery to service*: the first "
        "2xx write after the primary was back (writer rows), the thawed replica's first "
        "session in the router's `sessions` count (hung replica); n/a where the node's "
        "readmission is the measure. *Failed*: any status but 2xx, that is 5xx, "
        f"connection errors and client timeouts; the client timeout is "
        f"{LOADGEN_TIMEOUT:g} s (the load generator's default) in every fault scenario."
    )
    table.png = _plot(
        [
            ("reads (reader and run_read)", [("2xx", rec)], faults),
            ("writes", [("2xx", wrec)], [primary_fault]),
            (
                "hung primary: reads and writes at once",
                [("reads 2xx", hp_reads["records"]), ("writes 2xx", hp_wrec)],
                [hung_primary],
            ),
            (
                f"hung replica-1, read timeout {HUNG_READ_TIMEOUT} s",
                [
                    (f"{name} 2xx", [r for r in hr_reads["records"] if r[3] == which])
                    for which, name in enumerate(PATH_NAMES)
                ],
                [hung_replica],
            ),
        ],
        out_dir / "faults.png",
    )
    return table


def _hung_rows(
    table: Table, fault: Fault, records: Records, baseline: float, *, served: bool = False
) -> list[Records]:
    """Append one row per read path of a frozen node's scenario; the windows, per path."""
    windows = []
    for which, label in enumerate(PATH_NAMES):
        window = _window(records, fault.t_fault, fault.t_end, which)
        base = _before(records, fault.t_fault - baseline + 0.5, fault.t_fault, which)
        service = _fmt(fault.t_served, fault.t_recover) if served else "n/a"
        table.rows.append(_row(fault, label, window, base, service))
        windows.append(window)
    return windows


def _slowest(records: Records) -> str:
    return f"{max(r[1] for r in records):.2f} s" if records else "n/a"


def _summary(windows: list[Records]) -> str:
    """Failed reads per path, by kind, and the slowest read."""
    parts = [
        f"{label} {len(_failed(w))} failed of {len(w)} ({_kinds(w)}), slowest {_slowest(w)}"
        for label, w in zip(PATH_NAMES, windows, strict=True)
    ]
    return "; ".join(parts)


def _check_writes(cluster: Any, writes: dict[str, Any], tag: str, label: str) -> list[str]:
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
        f"{label}: {len(acked)} writes acknowledged (2xx), {len(lost)} of them lost, "
        f"{len(doubled)} stored more than once: {verdict}. {unacked} rows were committed "
        f"without a 2xx (the client saw an error; allowed, the promise is about 2xx only); "
        f"{len(writes['sent']) - len(acked)} writes failed in all."
    ]


Panel = tuple[str, list[tuple[str, Records]], list[Fault]]


def _plot(panels: list[Panel], png: Path) -> Path:
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.4 * len(panels)))
    for ax, (title, series, marks) in zip(axes, panels, strict=True):
        everything = [r for _, rec in series for r in rec]
        if not everything:
            continue
        t0 = min(r[0] for r in everything)
        for label, rec in series:
            ok = [r for r in rec if 200 <= r[2] < 300]
            ax.scatter([r[0] - t0 for r in ok], [r[1] * 1000 for r in ok], s=1, label=label)
        bad = _failed(everything)
        ax.scatter(
            [r[0] - t0 for r in bad], [r[1] * 1000 for r in bad], s=8, c="red", label="failed"
        )
        for fault in marks:
            ax.axvspan(fault.t_fault - t0, fault.t_end - t0, alpha=0.15, color="gray")
            ax.axvline(fault.t_recover - t0, color="gray", linestyle=":", linewidth=1)
            ax.text(fault.t_fault - t0, 0.9, fault.name, transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_ylabel("latency ms")
        ax.set_title(title)
        ax.legend(loc="upper right")
    axes[-1].set_xlabel("seconds (dotted: recovery, e.g. the thaw)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
