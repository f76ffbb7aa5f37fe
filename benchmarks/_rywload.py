"""Virtual clients that write and then read their own writes, run as their own process.

Each client is one keep-alive HTTP/1.1 connection with its own cookie jar (as one
browser; the cookies are sent back as a browser would, by name, without expiry),
in a closed loop with think time (``--think`` seconds on average between a
response and the next request): with probability ``--write-share`` it POSTs ``--write-path`` and
remembers the id it got back, else it GETs ``--read-path{id}`` for the id it wrote
last (a random id in ``1..--ids`` before its first write). The read route answers
``{"found": bool, "replica": bool}``; a read of the client's own last write that is
not found is a stale read. Plain asyncio streams rather than httpx: on two cores an
HTTP client library would take a large share of the CPU from the app it measures.

    python -m benchmarks._rywload --base http://127.0.0.1:8000 --out load.json --seconds 10

Records: reads ``[start, latency, status, own, found, replica, since_write]`` and
writes ``[start, latency, status]``; times in seconds, ``start`` on the monotonic
clock, ``since_write`` from the response to the client's last write to the start of
the read (-1 before it wrote), status 0 for a connection error or timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._loadgen import Connection

_TIMEOUT = 10.0


_ERRORS = (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError)


async def _client(
    index: int, args: argparse.Namespace, reads: list[list[Any]], writes: list[list[Any]]
) -> None:
    rng = random.Random(args.seed * 1000 + index)
    url = urlsplit(args.base)
    browser = Connection(url.hostname or "127.0.0.1", url.port or 80, cookies={})
    deadline = time.monotonic() + args.seconds
    latest: int | None = None
    written_at = 0.0
    while (start := time.monotonic()) < deadline:
        if rng.random() < args.write_share:
            try:
                status, body = await asyncio.wait_for(
                    browser.request("POST", args.write_path), _TIMEOUT
                )
                if status == 200:
                    latest = int(json.loads(body)["id"])
                    written_at = time.monotonic()
            except (*_ERRORS, KeyError):
                browser.close()
                status = 0
            writes.append([start, time.monotonic() - start, status])
        else:
            own = latest is not None
            item = latest if latest is not None else rng.randint(1, args.ids)
            found = replica = False
            try:
                status, body = await asyncio.wait_for(
                    browser.request("GET", f"{args.read_path}{item}"), _TIMEOUT
                )
                latency = time.monotonic() - start
                if status == 200:
                    answer = json.loads(body)
                    found, replica = bool(answer["found"]), bool(answer["replica"])
            except (*_ERRORS, KeyError):
                latency = time.monotonic() - start
                browser.close()
                status = 0
            since_write = start - written_at if own else -1.0
            reads.append([start, latency, status, int(own), int(found), int(replica), since_write])
        # Think time, uniform in [0.5, 1.5] x --think; at least 10 ms after an error,
        # so as not to spin on a refused connection.
        pause = args.think * rng.uniform(0.5, 1.5)
        await asyncio.sleep(max(pause, 0.01) if status == 0 else pause)
    browser.close()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    reads: list[list[Any]] = []
    writes: list[list[Any]] = []
    started = time.monotonic()
    await asyncio.gather(*(_client(i, args, reads, writes) for i in range(args.clients)))
    seconds = time.monotonic() - started
    cpu = sum(os.times()[:2])
    return {"seconds": seconds, "cpu": cpu, "reads": reads, "writes": writes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--write-share", type=float, default=0.2)
    parser.add_argument("--write-path", default="/ryw/items")
    parser.add_argument("--read-path", default="/ryw/items/")
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--think", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(asyncio.run(_main(args))))


if __name__ == "__main__":
    main()
