"""A small closed-loop HTTP/1.1 load generator, run as its own process.

It records every request (start time on the system-wide monotonic clock, latency,
status; 0 for a connection error, -1 for a client timeout), so that fault windows can
be cut out afterwards. ``--timeout`` is the client's timeout: a request without its
whole response by then is given up, as an HTTP client with a timeout does (the
connection is closed and the next request opens a new one), and recorded with the
time waited. Runs on uvloop when it is installed, as the app does, to spend less CPU
beside the server it loads.

    python -m benchmarks._loadgen --base http://127.0.0.1:8000 --out load.json --seconds 10

With several ``--base`` and ``--slice S``, time is cut into slices of S seconds and
slice k loads base k mod n with every connection (each connection keeps one socket
per base): a paired comparison of servers whose slices alternate faster than the
machine's own speed drifts (other tenants, frequency), which a round of 15 s per
variant cannot cancel. A slice starts only once the previous one's requests are done,
so two servers are never loaded at once. Each record then ends with its base's index.
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

TIMEOUT = 10.0  # the default client timeout, seconds
CONNECTION_ERROR = 0
CLIENT_TIMEOUT = -1


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
            # The whole head in one read: a readline per header costs the client more
            # CPU than the server spends on the request.
            head_bytes = await self.reader.readuntil(b"\r\n\r\n")
        except (ConnectionResetError, asyncio.IncompleteReadError):
            head_bytes = b""
        if not head_bytes:
            self.close()
            if reused and method == "GET":
                # The server closed an idle keep-alive connection: what every HTTP
                # client does, send the (idempotent) request again on a new one.
                return await self.request(method, path)
            raise ConnectionError("closed")
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        length = 0
        close = False
        for line in lines:
            name, _, value = line.partition(":")
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


class Slices:
    """Which base a request goes to: one base at a time, switched every ``length`` s."""

    def __init__(self, bases: int, length: float, started: float) -> None:
        self.bases, self.length, self.started = bases, length, started
        self.in_flight = [0] * bases
        self._idle = [asyncio.Event() for _ in range(bases)]
        for idle in self._idle:
            idle.set()

    async def target(self) -> int:
        """The base of the current slice, once no request to another is in flight."""
        if self.bases == 1:
            return 0
        while True:
            current = int((time.monotonic() - self.started) / self.length) % self.bases
            busy = [e for i, e in enumerate(self._idle) if i != current and not e.is_set()]
            if not busy:
                return current
            await busy[0].wait()

    def begin(self, target: int) -> None:
        self.in_flight[target] += 1
        self._idle[target].clear()

    def end(self, target: int) -> None:
        self.in_flight[target] -= 1
        if not self.in_flight[target]:
            self._idle[target].set()


async def _worker(
    index: int,
    conns: list[Connection],
    args: argparse.Namespace,
    deadline: list[float],
    records: list[list[Any]],
    acked: list[str],
    sent: list[str],
    slices: Slices,
) -> None:
    paths: list[str] = args.read_path or ["/items/"]
    for n in itertools.count():
        if time.monotonic() >= deadline[0]:
            break
        target = await slices.target()
        conn = conns[target]
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
        slices.begin(target)
        try:
            async with asyncio.timeout(args.timeout):  # no task per request, as wait_for
                status, _ = await conn.request(method, path)
        except TimeoutError:
            conn.close()
            status = CLIENT_TIMEOUT
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            conn.close()
            status = CONNECTION_ERROR
        finally:
            slices.end(target)
        latency = time.monotonic() - start
        records.append([start, latency, status, which, target])
        if key and 200 <= status < 300:
            acked.append(key)
        if status == CONNECTION_ERROR:
            await asyncio.sleep(0.01)  # do not spin on a refused connection
    for conn in conns:
        conn.close()


async def _spread_over_workers(
    conns: list[Connection], workers: int, ready_path: str, request_timeout: float
) -> dict[int, int]:
    """Open the connections so that each of ``workers`` server processes holds its share.

    Workers that share one listening socket accept a burst of new connections
    unevenly (the first awake takes them all), and keep-alive keeps them there. As a
    load balancer in front would, reconnect until no worker has more than its share:
    each connection asks ``ready_path`` which process (``pid``) serves it.
    """
    share = -(-len(conns) // workers)
    held: dict[int, int] = {}
    attempts = 0
    for conn in conns:
        while True:
            attempts += 1
            if attempts > 50 * len(conns):
                raise RuntimeError(f"could not spread connections over workers: {held}")
            async with asyncio.timeout(request_timeout):
                status, body = await conn.request("GET", ready_path)
            if status != 200:
                raise RuntimeError(f"{ready_path} answered {status}")
            pid = int(json.loads(body)["pid"])
            if held.get(pid, 0) < share:
                held[pid] = held.get(pid, 0) + 1
                break
            conn.close()
            await asyncio.sleep(0.002)  # let the other workers reach accept()
    return held


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    records: list[list[Any]] = []
    acked: list[str] = []
    sent: list[str] = []
    urls = [urlsplit(base) for base in args.base]
    conns = [
        [Connection(url.hostname or "127.0.0.1", url.port or 80) for url in urls]
        for _ in range(args.concurrency)
    ]
    held: dict[int, int] = {}
    if args.workers > 1:
        held = await _spread_over_workers(
            [c[0] for c in conns], args.workers, args.ready_path, args.timeout
        )
    started = time.monotonic()
    deadline = [started + args.seconds]
    slices = Slices(len(urls), args.slice or args.seconds, started)
    # SIGUSR1 ends the run early (each worker finishes its request in flight).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, deadline.__setitem__, 0, 0.0)
    await asyncio.gather(
        *(_worker(i, c, args, deadline, records, acked, sent, slices) for i, c in enumerate(conns))
    )
    seconds = time.monotonic() - started
    cpu = sum(os.times()[:2])
    return {
        "seconds": seconds,
        "cpu": cpu,
        "records": records,
        "acked": acked,
        "sent": sent,
        "connections_per_worker": sorted(held.values(), reverse=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", action="append", required=True)
    parser.add_argument(
        "--slice", type=float, default=0.0, help="with several --base: seconds per slice"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", choices=["read", "write"], default="read")
    parser.add_argument("--read-path", action="append")
    parser.add_argument("--write-path", default="/items")
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--tag", default="w")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="client timeout per request, seconds"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes to spread the connections over (asks --ready-path)",
    )
    parser.add_argument("--ready-path", default="/ready")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_main(args))
    else:
        result = uvloop.run(_main(args))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
