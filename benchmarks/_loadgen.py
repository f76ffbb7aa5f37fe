"""A small closed-loop HTTP/1.1 load generator, run as its own process.

It records every request (start time on the system-wide monotonic clock, latency,
status; 0 for a connection error or timeout), so that fault windows can be cut out
afterwards. Used for the fault benchmark and where ``wrk`` is not installed.

    python -m benchmarks._loadgen --base http://127.0.0.1:8000 --out load.json --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_TIMEOUT = 10.0


class Connection:
    """One keep-alive HTTP/1.1 connection; with ``cookies`` (a dict), also a cookie jar."""

    def __init__(self, host: str, port: int, cookies: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.cookies = cookies
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str) -> tuple[int, bytes]:
        """Send one request; its status and body."""
        reused = self.writer is not None
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 0\r\n"
        if self.cookies:
            head += "Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()) + "\r\n"
        self.writer.write((head + "\r\n").encode("latin-1"))
        try:
            status_line = await self.reader.readline()
        except ConnectionResetError:
            status_line = b""
        if not status_line:
            self.close()
            if reused and method == "GET":
                # The server closed an idle keep-alive connection: what every HTTP
                # client does, send the (idempotent) request again on a new one.
                return await self.request(method, path)
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length = 0
        close = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            lname = name.strip().lower()
            if lname == "content-length":
                length = int(value.strip())
            elif lname == "connection" and value.strip().lower() == "close":
                close = True
            elif lname == "set-cookie" and self.cookies is not None:
                key, _, rest = value.strip().partition("=")
                self.cookies[key.strip()] = rest.split(";", 1)[0].strip()
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _worker(
    index: int,
    args: argparse.Namespace,
    deadline: list[float],
    records: list[list[Any]],
    acked: list[str],
    sent: list[str],
) -> None:
    url = urlsplit(args.base)
    conn = Connection(url.hostname or "127.0.0.1", url.port or 80)
    paths: list[str] = args.read_path or ["/items/"]
    for n in itertools.count():
        start = time.monotonic()
        if start >= deadline[0]:
            break
        key = ""
        if args.mode == "write":
            key = f"{args.tag}-{index}-{n}"
            method, path, which = "POST", f"{args.write_path}?k={key}", 0
            sent.append(key)
        else:
            which = n % len(paths)
            method, path = "GET", f"{paths[which]}{(index * 7919 + n * 31) % args.ids + 1}"
        try:
            status, _ = await asyncio.wait_for(conn.request(method, path), _TIMEOUT)
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            conn.close()
            status = 0
        latency = time.monotonic() - start
        records.append([start, latency, status, which])
        if key and 200 <= status < 300:
            acked.append(key)
        if status == 0:
            await asyncio.sleep(0.01)  # do not spin on a refused connection
    conn.close()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    records: list[list[Any]] = []
    acked: list[str] = []
    sent: list[str] = []
    started = time.monotonic()
    deadline = [started + args.seconds]
    # SIGUSR1 ends the run early (each worker finishes its request in flight).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, deadline.__setitem__, 0, 0.0)
    await asyncio.gather(
        *(_worker(i, args, deadline, records, acked, sent) for i in range(args.concurrency))
    )
    seconds = time.monotonic() - started
    cpu = sum(os.times()[:2])
    return {"seconds": seconds, "cpu": cpu, "records": records, "acked": acked, "sent": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", choices=["read", "write"], default="read")
    parser.add_argument("--read-path", action="append")
    parser.add_argument("--write-path", default="/items")
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--tag", default="w")
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(asyncio.run(_main(args))))


if __name__ == "__main__":
    main()
