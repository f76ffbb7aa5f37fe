"""Tracing's cost on the read path: no tracer provider against an SDK with an in-memory exporter.

A router over the primary and one replica, health checks on, runs sequential sessions,
each one ``SELECT 1`` (reads through ``router.reader_session()``, writes through
``router.writer_session()``, which commits and reads the WAL position), in blocks that
alternate in one process, so that the machine's other load falls on both alike:

- *off*: no tracer provider configured (opentelemetry-api is installed, as FastAPI
  brings it): the router resolved once, at its first session, that tracing is off.
- *sdk*: the SDK's ``TracerProvider`` with a ``SimpleSpanProcessor`` and an
  ``InMemorySpanExporter`` (``replica_router.otel.instrument``): a span per reader,
  two per writer (checkout, commit).
- *sampled out*: the same with the ``ALWAYS_OFF`` sampler (what the unsampled share
  of requests costs under ratio sampling).

Per session: the median wall time, and the process's CPU time over the sessions.
With ``REPLICA_ROUTER_BENCH_BASELINE`` naming a source tree (a folder with
``replica_router/``) without the tracing hooks, a *before* process runs the *off*
blocks on it, interleaved with the current code's process in every round.

    python -m benchmarks --only otel
    python -m benchmarks.otel worker before|current PRIMARY_URL REPLICA_URL BLOCKS READS WRITES
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import ROOT, Table, spread, spread_bar

BASELINE_ENV = "REPLICA_ROUTER_BENCH_BASELINE"
COLORS = {"before": "tab:gray", "off": "tab:blue", "sdk": "tab:orange", "sampled out": "tab:green"}


def run(cluster: Any, out_dir: Path, quick: bool) -> Table:
    rounds, blocks, reads, writes = (1, 2, 200, 50) if quick else (5, 10, 500, 100)
    baseline = os.environ.get(BASELINE_ENV)
    kinds = (["before"] if baseline else []) + ["current"]
    variants = (["before"] if baseline else []) + ["off", "sdk", "sampled out"]
    found: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for index in range(rounds):
        for kind in kinds[index % len(kinds) :] + kinds[: index % len(kinds)]:
            got = _worker(kind, cluster, blocks, reads, writes)
            if kind == "before":
                found["before"].append(got["off"])
            else:
                for mode in ("off", "sdk", "sampled out"):
                    found[mode].append(got[mode])
    table = Table(
        name="otel",
        title=f"Tracing off and on, per session ({rounds} rounds of {blocks} blocks of "
        f"{reads} reads and {writes} writes per variant, the variants' blocks alternating)",
        columns=[
            "variant",
            "read p50 us",
            "read CPU us",
            "write p50 us",
            "write CPU us",
            "spans per read / write",
        ],
    )
    for variant in variants:
        runs = found[variant]
        table.rows.append(
            [
                variant,
                spread([r["read_p50_us"] for r in runs]),
                spread([r["read_cpu_us"] for r in runs]),
                spread([r["write_p50_us"] for r in runs]),
                spread([r["write_cpu_us"] for r in runs]),
                f"{runs[0]['spans_per_read']:g} / {runs[0]['spans_per_write']:g}",
            ]
        )

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in found[variant])

    def delta(key: str, variant: str = "sdk") -> str:
        # Per round, the variant's blocks minus the off blocks beside them; the median.
        pairs = zip(found[variant], found["off"], strict=True)
        return spread([v[key] - o[key] for v, o in pairs])

    table.notes.append(
        f"sdk - off, per read: {delta('read_cpu_us')} us CPU, {delta('read_p50_us')} us at "
        f"p50; per write (two spans): {delta('write_cpu_us')} us CPU. Sampled out "
        f"(ALWAYS_OFF) - off, per read: {delta('read_cpu_us', 'sampled out')} us CPU."
    )
    if baseline:
        before, off = median("before", "read_cpu_us"), median("off", "read_cpu_us")
        table.notes.append(
            f"off / before, per read: {off / before:.3f}x CPU, "
            f"{median('off', 'read_p50_us') / median('before', 'read_p50_us'):.3f}x p50, "
            f"medians over rounds (before: {BASELINE_ENV}={baseline})."
        )
    else:
        table.notes.append(f"no *before* variant: {BASELINE_ENV} is not set.")
    table.png = _plot(found, out_dir / "otel.png")
    return table


def _worker(
    kind: str, cluster: Any, blocks: int, reads: int, writes: int
) -> dict[str, dict[str, float]]:
    """One process of the current code (or the baseline's); its JSON line."""
    env = dict(os.environ)
    paths = [str(ROOT)]
    if kind == "before":
        paths.insert(0, env[BASELINE_ENV])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    command = [sys.executable, "-m", "benchmarks.otel", "worker", kind]
    command += [cluster.primary_url, cluster.replica_urls[0], str(blocks), str(reads), str(writes)]
    # Not the repository as the working directory: its replica_router would come first.
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"otel worker {kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _plot(found: dict[str, list[dict[str, float]]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key, title in (
        (axes[0], "read_cpu_us", "CPU per read (us)"),
        (axes[1], "write_cpu_us", "CPU per write (us)"),
    ):
        for x, (variant, runs) in enumerate(found.items()):
            spread_bar(ax, x, [r[key] for r in runs], color=COLORS[variant])
        ax.set_xticks(range(len(found)), list(found))
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the worker process ---------------------------------------------------------------


async def _sessions(
    kind: str, primary: str, replica: str, blocks: int, reads: int, writes: int
) -> dict[str, dict[str, float]]:
    from sqlalchemy import text

    from replica_router import ReplicaRouter, RouterSettings

    select = text("SELECT 1")
    # Reads stay on the replica: an idle primary's WAL insert position (read after each
    # writer's COMMIT) can sit a page header beyond anything a replica replays, which
    # the default lag bound would count as lag within seconds.
    settings = RouterSettings.defaults(max_lag_seconds=3600.0)
    router = ReplicaRouter(primary, [replica], settings=settings)
    modes = ["off"]
    exporter: Any = None
    if kind == "current":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        from replica_router.otel import instrument, uninstrument

        exporter = InMemorySpanExporter()
        providers = {"sdk": TracerProvider(), "sampled out": TracerProvider(sampler=ALWAYS_OFF)}
        for provider in providers.values():
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        modes += list(providers)

    def use(mode: str) -> None:
        if kind != "current":
            return
        if mode == "off":
            uninstrument(router)
        else:
            instrument(router, tracer_provider=providers[mode], metrics=False)

    async def read() -> None:
        async with router.reader_session() as db:
            await db.execute(select)

    async def write() -> None:
        async with router.writer_session() as db:
            await db.execute(select)

    walls: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    spans: dict[tuple[str, str], float] = {}

    async def timed(mode: str, name: str, step: Any, count: int) -> None:
        exported = len(exporter.get_finished_spans()) if exporter is not None else 0
        lap = walls.setdefault((mode, name), [])
        cpu = time.process_time()
        for _ in range(count):
            started = time.perf_counter()
            await step()
            lap.append(time.perf_counter() - started)
        cpus.setdefault((mode, name), []).append((time.process_time() - cpu) / count)
        if exporter is not None:
            spans[(mode, name)] = (len(exporter.get_finished_spans()) - exported) / count
            exporter.clear()

    async with router:
        # Warm-up (connections, statement caches, both code paths). The first session
        # resolves the automatic switch: no provider configured, so off.
        for mode in modes:
            if mode != "off":
                use(mode)
            for _ in range(100):
                await read()
                await write()
            if kind == "current" and mode == "off":
                assert router._checkout.trace is None
        for block in range(blocks * len(modes)):
            mode = modes[block % len(modes)]
            use(mode)
            await timed(mode, "read", read, reads)
            await timed(mode, "write", write, writes)
        decisions = router.status().reads[0].decisions
    # Reads on the replica (a few re-read its position: the task's own writes). A
    # writer's position read after COMMIT on an idle primary can stay a page header
    # beyond what the replica replays until more WAL comes, so a rare read waits out
    # consistency_wait and goes to the primary (11 of 15,300 in one loaded run): it
    # must stay rare, or the read figures would measure the primary.
    on_primary = sum(n for d, n in decisions.items() if d.startswith("primary"))
    assert on_primary <= 0.01 * sum(decisions.values()), decisions
    return {
        mode: {
            "read_p50_us": statistics.median(walls[(mode, "read")]) * 1e6,
            "read_cpu_us": statistics.median(cpus[(mode, "read")]) * 1e6,
            "write_p50_us": statistics.median(walls[(mode, "write")]) * 1e6,
            "write_cpu_us": statistics.median(cpus[(mode, "write")]) * 1e6,
            "spans_per_read": spans.get((mode, "read"), 0.0),
            "spans_per_write": spans.get((mode, "write"), 0.0),
        }
        for mode in modes
    }


def _main(argv: list[str]) -> int:
    if len(argv) != 7 or argv[0] != "worker" or argv[1] not in ("before", "current"):
        print(__doc__, file=sys.stderr)
        return 2
    _, kind, primary, replica, blocks, reads, writes = argv
    result = asyncio.run(_sessions(kind, primary, replica, int(blocks), int(reads), int(writes)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
