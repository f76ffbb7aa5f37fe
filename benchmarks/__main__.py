"""Run the benchmarks against a throwaway local cluster (a primary and two replicas).

    python -m benchmarks                 # everything, about 30 minutes on 2 cores
    python -m benchmarks --quick         # a short run that proves the scripts work
    python -m benchmarks --only overhead --out /tmp/bench

Each benchmark prints a markdown table, writes it to ``<name>.md`` and writes a PNG;
``results.md`` collects every ``<name>.md`` in the output folder, so a run with
``--only`` replaces its own tables and keeps the others from earlier runs (each table's
last note names the command and the day that measured it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replica_router.testing import LocalCluster

from ._common import LOAD_GENERATOR, TIMEOUT, Table, interrupt_guard, kill_children
from ._schema import SCHEMA

BENCHMARKS = (
    "overhead",
    "paired",
    "profile",
    "instructions",
    "drivers",
    "faults",
    "strategies",
    "scale",
    "pgpool",
    "ryw",
    "otel",
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about four minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where tables and plots go")
    parser.add_argument(
        "--only", action="append", choices=BENCHMARKS, help="run only this one (repeatable)"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    started = time.monotonic()
    version = "?"
    command = (
        "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + "".join(f" --only {n}" for n in args.only or ())
    )
    day = time.strftime("%Y-%m-%d")
    with interrupt_guard():
        cluster = LocalCluster(replicas=2)
        try:
            cluster.start()
            cluster.execute("primary", SCHEMA)
            cluster.wait_for_replay()
            version = cluster.execute("primary", "SHOW server_version")[0][0]
            for name in names:
                run: Callable[[Any, Path, bool], Table] = importlib.import_module(
                    f"benchmarks.{name}"
                ).run
                t0 = time.monotonic()
                print(f"\n## {name} ...", flush=True)
                table = run(cluster, out, args.quick)
                table.notes.append(
                    f"{name} took {time.monotonic() - t0:.0f} s (`{command}`, {day}, "
                    f"PostgreSQL {version})."
                )
                print(table.markdown(), flush=True)
                (out / f"{name}.md").write_text(table.markdown())
        except KeyboardInterrupt:
            print("interrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            kill_children()
            cluster.stop()
    wall = time.monotonic() - started
    header = [
        "# replica-router benchmarks",
        "",
        f"Command: `{command}`; wall time {wall:.0f} s; {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; PostgreSQL {version}; "
        f"load generator {LOAD_GENERATOR}, client timeout {TIMEOUT:g} s; "
        "uvicorn with uvloop and httptools. Tables this command did not run are kept from "
        "earlier runs: each one's last note names the command that measured it.",
        "",
    ]
    parts = [(out / f"{n}.md").read_text() for n in BENCHMARKS if (out / f"{n}.md").is_file()]
    (out / "results.md").write_text("\n".join(header) + "\n".join(parts))
    print(f"\nwrote {out / 'results.md'}; wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
