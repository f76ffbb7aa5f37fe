"""``uvicorn benchmarks.app:app`` with cProfile switched by signals (for ``profile``).

SIGUSR1 starts profiling, SIGUSR2 stops it and writes the stats to ``BENCH_PROFILE_OUT``.

    python -m benchmarks._profserve PORT
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from typing import Any

import uvicorn


def main() -> None:
    profiler = cProfile.Profile()

    def start(*_: Any) -> None:
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(os.environ["BENCH_PROFILE_OUT"])

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    uvicorn.run(
        "benchmarks.app:app",
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
