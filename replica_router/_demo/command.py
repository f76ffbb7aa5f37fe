"""``run_demo``: start a cluster, run the demo over it, print the summary, exit status."""

import asyncio
import sys
import time
from typing import TextIO

from .app import DemoSetupError, check_packages
from .records import EventLog, capture_router_logs
from .scenario import Demo
from .view import display, summary

__all__ = ["INTERRUPTED", "MISBEHAVED", "OK", "SETUP_FAILED", "run_demo"]

# Exit statuses.
OK = 0
MISBEHAVED = 1
SETUP_FAILED = 2
INTERRUPTED = 130


async def _main(demo: Demo) -> None:
    view = asyncio.create_task(display(demo))
    try:
        await demo.run()
    finally:
        demo.finish()
        await view


def run_demo(
    duration: float = 45.0,
    replicas: int = 2,
    *,
    out: TextIO | None = None,
    interactive: bool | None = None,
) -> int:
    """Run the demo and return its exit status.

    Args:
        duration: seconds of traffic and faults (cluster start-up comes on top).
        replicas: streaming replicas to start, at least 2.
        out: where the display and the summary go (default: standard output).
        interactive: a refreshing table (default: when ``out`` is a terminal), or
            plain periodic prints.

    Returns:
        0 when everything behaved, 1 when something did not, 2 when the demo could
        not start, 130 when interrupted.
    """
    out = out or sys.stdout
    if interactive is None:
        interactive = out.isatty()
    try:
        check_packages()
        from ..testing import LocalCluster, PostgresNotFoundError
    except DemoSetupError as exc:
        print(f"replica-router demo: {exc}", file=sys.stderr)
        return SETUP_FAILED
    print(
        f"replica-router demo: starting a primary and {replicas} replicas...", file=out, flush=True
    )
    started = time.monotonic()
    demo: Demo | None = None
    try:
        with LocalCluster(replicas=replicas) as cluster:
            cluster.execute(
                "primary",
                "CREATE TABLE demo_notes (id bigserial PRIMARY KEY, body text NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now())",
            )
            cluster.wait_for_replay()
            print(
                f"replica-router demo: cluster up in {time.monotonic() - started:.1f} s "
                f"in {cluster.base_dir} (binaries: {cluster.bin_dir})",
                file=out,
                flush=True,
            )
            demo = Demo(cluster, duration, out, interactive)
            with capture_router_logs(EventLog(demo.events, demo.clock)):
                asyncio.run(_main(demo))
            text, ok = summary(demo)
        # The cluster is stopped once the block has ended.
        print(text, file=out, flush=True)
        print(
            f"replica-router demo: cluster stopped; total {time.monotonic() - started:.1f} s",
            file=out,
            flush=True,
        )
    except KeyboardInterrupt:
        if demo is not None:
            print(summary(demo)[0], file=out, flush=True)
        print("replica-router demo: interrupted; cluster stopped", file=out, flush=True)
        return INTERRUPTED
    except PostgresNotFoundError as exc:
        print(f"replica-router demo: {exc}", file=sys.stderr)
        return SETUP_FAILED
    if demo.interrupted:
        return INTERRUPTED
    return OK if ok else MISBEHAVED
