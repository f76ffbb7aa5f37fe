"""Kill a local cluster's servers when the process that owns it dies.

Run as ``python _watchdog.py BASE_DIR`` with a pipe on standard input. The
watchdog blocks until that pipe reaches end of file, which happens when the
owner closes it (``LocalCluster.stop()``) or dies in any way, SIGKILL included.
It then SIGKILLs every process whose working directory lies under
``BASE_DIR`` (a PostgreSQL server and all its children work in their data
directory) and removes ``BASE_DIR``.

It uses only the standard library and is run by path, not as part of the
package, so that it starts fast and needs nothing importable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

__all__ = ["processes_under", "sweep"]


def processes_under(directory: str, *, exact: bool = False) -> list[int]:
    """Return the ids of live processes whose working directory is (under) ``directory``."""
    directory = os.path.realpath(directory)
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue  # gone, a zombie, or not ours to inspect
        if cwd == directory or (not exact and cwd.startswith(directory + os.sep)):
            found.append(int(entry))
    return found


def _pids_from_lock_files(directory: str) -> list[int]:
    """Postmaster ids from ``postmaster.pid`` files, for systems without ``/proc``."""
    pids: list[int] = []
    for root, _dirs, files in os.walk(directory):
        if "postmaster.pid" in files:
            try:
                with open(os.path.join(root, "postmaster.pid")) as lock:
                    pids.append(int(lock.readline().strip()))
            except (OSError, ValueError):
                continue
    return pids


def sweep(directory: str, *, exact: bool = False, timeout: float = 10.0) -> None:
    """SIGKILL every process working in ``directory`` until none is left or time runs out."""
    use_proc = os.path.isdir("/proc/self")
    deadline = time.monotonic() + timeout
    while True:
        if use_proc:
            pids = processes_under(directory, exact=exact)
        else:  # pragma: no cover - non-Linux fallback
            pids = _pids_from_lock_files(directory)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if not use_proc:  # pragma: no cover - cannot check again without /proc
            return
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    """Wait for end of file on standard input, then clean up ``argv[1]``."""
    if len(argv) != 2:
        print("usage: _watchdog.py BASE_DIR", file=sys.stderr)
        return 2
    base_dir = os.path.realpath(argv[1])
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    try:
        while stdin.read(4096):
            pass
    except OSError:
        pass
    sweep(base_dir)
    shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
